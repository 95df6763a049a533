"""nq on a tiny task.json of the real structure: parsing, near-copy grouping, leak-free group split, CLI."""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from twotower import cli as twotower_cli
from twotower.eval.suites import nq
from twotower.eval.suites.beir import file_sha256, load_beir
from twotower.eval.suites.build import SUITES
from twotower.eval.suites.cli import SUITE_NAMES

VOCAB = [f"w{i}x" for i in range(3000)]


def paragraph(rng: random.Random, n: int = 40) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def example(question: str, passage: str, swapped: str, original: str) -> dict:
    assert swapped in passage, "the swapped-in answer appears in the passage, as in the real task"
    return {"input": f"\nQuestion: {question}\nContext: {passage}", "target": swapped,
            "target_scores": {swapped: 1, original: 0}}


def make_task(n_unrelated: int = 20) -> dict:
    """One paragraph with 3 answer swaps + a second question + a revised copy, and unrelated ones."""
    rng = random.Random(0)
    words = paragraph(rng)
    base = " ".join(words[:10] + ["Ada Lovelace"] + words[10:20] + ["1843"] + words[20:])
    revised = " ".join(words[:10] + ["Ada Lovelace"] + words[10:20] + ["1843"] + words[20:35] + paragraph(rng, 6))
    examples = [
        example("who wrote the first program?", base.replace("Ada Lovelace", s), s, "Ada Lovelace")
        for s in ("Grace Hopper", "Alan Turing", "Edsger Dijkstra")
    ]
    examples.append(example("when was the first program written?", base.replace("1843", "1901"), "1901", "1843"))
    revised = revised.replace("Ada Lovelace", "Kurt Godel")
    examples.append(example("who is credited with the first program?", revised, "Kurt Godel", "Ada Lovelace"))
    for i in range(n_unrelated):
        w = paragraph(rng)
        passage = " ".join(w[:5] + [f"Answer{i}"] + w[5:])
        examples.append(example(f"unrelated question {i}?", passage, f"Answer{i}", f"Orig{i}"))
    return {"name": "contextual_parametric_knowledge_conflicts", "canary": "test canary", "examples": examples}


@pytest.fixture
def task_json(tmp_path: Path) -> Path:
    path = tmp_path / "task.json"
    path.write_text(json.dumps(make_task()), encoding="utf-8")
    return path


def make_sdist(path: Path, task: dict) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in (("bigbench-1.0.0/README.md", b"readme"),
                           (f"bigbench-1.0.0/{nq.TASK_MEMBER}", json.dumps(task).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_parse_examples() -> None:
    exs = nq.parse_examples(make_task())
    assert exs[0].question == "who wrote the first program?"
    assert exs[0].answer == "Grace Hopper" and exs[0].original == "Ada Lovelace" and "Grace Hopper" in exs[0].passage
    bad = make_task()
    bad["examples"][3]["input"] = "no question here"
    with pytest.raises(ValueError, match="example 3: field 'input'"):
        nq.parse_examples(bad)
    bad = make_task()
    bad["examples"][2]["target_scores"] = {"x": 1}
    with pytest.raises(ValueError, match="example 2: needs 'target'"):
        nq.parse_examples(bad)


def test_grouping_joins_swaps_and_revisions_only() -> None:
    exs = nq.parse_examples(make_task())
    group = nq.group_examples(exs)
    assert len(set(group[:5])) == 1  # 3 swaps, a swap of another answer, a revised paragraph
    assert len(set(group[5:])) == len(exs) - 5 and group[0] not in group[5:]
    strict = nq.group_examples(exs, threshold=0.99)
    assert len(set(strict[:4])) == 1 and strict[4] != strict[0]  # exact copies still join by undoing the swap


@pytest.mark.parametrize("seed", range(4))
def test_group_split_leaks_nothing_and_all_members_relevant(task_json: Path, seed: int) -> None:
    built = nq.build([task_json], seed=seed, test_fraction=0.25)
    test_ids = {q for q in built.qrels}
    test_docs = {d for rel in built.qrels.values() for d in rel}
    doc_text = {r["_id"]: r["text"] for r in built.corpus}
    test_text = {doc_text[d] for d in test_docs}
    pairs = built.train + built.dev
    assert len(pairs) + len(test_ids) == 25 and len(built.dev) >= 2 and len(built.train) > 10
    assert not any(p["positive"] in test_text for p in pairs)
    assert not {p["query"] for p in pairs} & {r["text"] for r in built.queries}
    for qid, rel in built.qrels.items():  # one question of the copy group relevant to all 5 passages
        assert set(rel.values()) == {1}
        assert len(rel) == (5 if "program" in next(r["text"] for r in built.queries if r["_id"] == qid) else 1)
    assert len(built.corpus) == 25  # every distinct passage; train/dev ones are distractors
    assert len(nq.build([task_json], seed=seed, test_fraction=0.25, distractors=False).corpus) == len(test_docs)


def test_copy_group_lands_in_test_for_some_seed(task_json: Path) -> None:
    assert any(len(nq.build([task_json], seed=s, test_fraction=0.25).queries) >= 5 for s in range(10))


def test_read_task_streams_only_the_member(tmp_path: Path) -> None:
    task = make_task(3)
    assert nq.read_task(make_sdist(tmp_path / "bigbench-1.0.0.tar.gz", task)) == task
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tf:
        tf.addfile(tarfile.TarInfo("x/readme"), io.BytesIO(b""))
    with pytest.raises(ValueError, match="no member"):
        nq.read_task(other)


def test_cli_build_and_info_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    sdist = make_sdist(downloads / nq.SDIST_NAME, make_task())
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    assert twotower_cli.main(["data", "build", "nq", "--out", str(tmp_path / "nq")]) == 2  # sha pin mismatch
    assert "does not match the pin" in capsys.readouterr().err
    monkeypatch.setattr(nq, "SDIST_SHA256", file_sha256(sdist))  # the fixture stands in for the real sdist
    out = tmp_path / "nq"
    assert twotower_cli.main(["data", "build", "nq", "--out", str(out), "--max-queries", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert twotower_cli.main(["data", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["queries"] == 2 and info["checksum"] == load_beir(out).checksum
    assert info["train_pairs"] > info["dev_pairs"] > 0 and info["files_verified"] == 5
    assert info["build"]["max_queries"] == 2 and info["stats"]["examples"] == 25
    assert twotower_cli.main(["data", "info", str(tmp_path)]) == 2  # not a suite: one clean error line
    assert "BEIR suite file missing" in capsys.readouterr().err


def test_cli_names_match_builders() -> None:
    assert SUITE_NAMES == tuple(SUITES)
