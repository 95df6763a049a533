"""Clear, fast errors for common misuse: a --pairs that is neither a file nor a hub name, a TOWERS dir moved
after the index was built, a --dev set that overlaps --pairs; and /docs that works without internet."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.conftest import build_tiny_index
from twotower import cli as twotower_cli


@pytest.fixture(scope="module")
def tiny(_tiny_models, tmp_path_factory):
    return build_tiny_index(tmp_path_factory.mktemp("misuse"), _tiny_models["bert"], n_docs=10)


@pytest.mark.parametrize("name", ["pairs", "train_pairs", "my pairs", "a/b/c"])
def test_pairs_neither_a_file_nor_a_hub_name_fails_without_asking_the_hub(name, monkeypatch, tmp_path, capsys):
    import datasets

    def no_network(*args, **kwargs):
        raise AssertionError("the hub client must not be asked")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.chdir(tmp_path)
    assert twotower_cli.main(["train", "--pairs", name, "--out", "t", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"twotower train: error: no such file '{name}'; a hub dataset needs owner/name (e.g. " \
                  f"sentence-transformers/natural-questions)", err
    assert not (tmp_path / "t").exists()


def test_a_moved_towers_dir_names_the_recorded_path_and_the_fix(_tiny_models, tmp_path, capsys):
    towers, idx = build_tiny_index(tmp_path, _tiny_models["bert"], n_docs=10)
    moved = tmp_path / "towers-moved"
    shutil.move(towers, moved)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"_id": "x", "text": "new"}) + "\n")
    for argv in (["search", "--index", str(idx), "--device", "cpu", "q"],
                 ["serve", "--index", str(idx), "--device", "cpu"],
                 ["index", "add", str(idx), "--corpus", str(corpus), "--device", "cpu", "--no-progress"]):
        assert twotower_cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.search(rf"index '{re.escape(str(idx))}' was built with towers dir '{re.escape(str(towers))}', "
                         r"which no longer exists \(moved or deleted\?\); pass --towers DIR", err), err
    assert twotower_cli.main(["search", "--index", str(idx), "--device", "cpu", "--towers", str(moved), "q"]) == 0


def test_dev_overlapping_pairs_is_warned_with_the_count(_tiny_models, tmp_path, capsys):
    rows = [{"query": f"query {i}", "positive": f"answer {i}"} for i in range(8)]
    pairs, dev = tmp_path / "pairs.jsonl", tmp_path / "dev.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[5:] + [{"query": "new", "positive": "unseen"}]))
    common = ["--base", str(_tiny_models["bert"]), "--batch-size", "2", "--max-steps", "1", "--device", "cpu",
              "--query-max-length", "8", "--result-max-length", "8", "--allow-no-gain"]
    assert twotower_cli.main(["train", "--pairs", str(pairs), "--dev", str(dev), "--out", str(tmp_path / "a"),
                              *common]) == 0
    assert "twotower train: warning: 3 of 4 --dev pairs are also in --pairs (same query and positive); dev " \
           "recall@10 will be optimistic" in capsys.readouterr().err
    assert twotower_cli.main(["train", "--pairs", str(pairs), "--dev", str(pairs), "--out", str(tmp_path / "b"),
                              *common]) == 0
    assert "warning: --dev is the same file as --pairs" in capsys.readouterr().err


def test_docs_page_is_served_by_the_app_with_nothing_from_a_cdn(tiny):
    from fastapi.testclient import TestClient

    from twotower.retrieval.config import ServeConfig
    from twotower.retrieval.retriever import Retriever
    from twotower.retrieval.server import create_app

    _, idx = tiny
    with TestClient(create_app(ServeConfig(index=str(idx), reload_interval=0), Retriever.load(idx, device="cpu"))) as c:
        page = c.get("/docs")
        redoc = c.get("/redoc")
        schema = c.get("/openapi.json")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "POST" in html and "/search" in html and "/health" in html and "curl" in html and "queries" in html
    # nothing loaded from elsewhere: no script or stylesheet at all, and no absolute URL in src/href
    assert "<script" not in html and "<link" not in html, html[:500]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), re.findall(r"(?:src|href)=\S+", html)
    assert "cdn" not in html.lower()
    assert redoc.status_code == 404 and schema.status_code == 200 and "/search" in schema.json()["paths"]
