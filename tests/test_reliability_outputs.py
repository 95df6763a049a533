"""Output dirs never destroy what twotower did not make (``common.outputs``, ``common.atomic``).

Every verb that writes a dir is run (through the CLI, in process) against every class of dangerous ``--out``:
a file, a foreign non-empty dir, the current directory, a dir above it, ``/``, a dir holding the command's
input, another kind of twotower artefact. Each must be refused with one line naming the option, exit 2, and
leave every byte of the victim as it was. Then ``--work-dir``, symlinked outputs (blue/green
``current -> index-v7``) and the permissions of what is published.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import build_tiny_index, make_corpus
from twotower import cli as twotower_cli


def snapshot(path: Path) -> dict[str, str]:
    """Every entry under ``path`` (and ``path`` itself) with its kind and content hash: what must not change."""
    def one(p: Path) -> str:
        if p.is_symlink():
            return "link:" + os.readlink(p)
        if p.is_dir():
            return "dir"
        return hashlib.sha256(p.read_bytes()).hexdigest()

    if not path.exists() and not path.is_symlink():
        return {}
    entries = {".": one(path)}
    if path.is_dir() and not path.is_symlink():
        entries.update({str(p.relative_to(path)): one(p) for p in sorted(path.rglob("*"))})
    return entries


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = twotower_cli.main(argv)
    except SystemExit as exc:
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def art(_tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Real artefacts of every kind (read-only: tests copy what they damage)."""
    from twotower.eval.suites.beir import write_beir

    root = tmp_path_factory.mktemp("outputs")
    towers, index = build_tiny_index(root, _tiny_models["bert"], n_docs=30)
    suite = write_beir(root / "suite", [{"_id": "d1", "title": "", "text": "sort a list"},
                                        {"_id": "d2", "title": "", "text": "open a file"}],
                       [{"_id": "q1", "text": "sorting"}], {"q1": {"d1": 1}})
    corpus = root / "inputs" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps(r) + "\n" for r in make_corpus(8, seed=1)))
    pairs = root / "inputs" / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(4)))
    return {"towers": towers, "index": index, "suite": suite, "corpus": corpus, "pairs": pairs,
            "base": _tiny_models["bert"]}


# verb -> argv with OUT as its output dir (with --overwrite where the verb has it: even then nothing foreign goes)
VERBS: dict[str, Callable[[dict[str, Path], str], list[str]]] = {
    "index-build": lambda a, out: ["index", "build", "--towers", str(a["towers"]), "--corpus", str(a["corpus"]),
                                   "--out", out, "--device", "cpu", "--no-progress", "--overwrite"],
    "index-merge": lambda a, out: ["index", "merge", "--shards", str(a["index"]), "--out", out, "--overwrite",
                                   "--no-progress"],
    "train": lambda a, out: ["train", "--pairs", str(a["pairs"]), "--out", out, "--base", str(a["base"]),
                             "--batch-size", "2", "--max-steps", "1", "--device", "cpu", "--overwrite"],
    "data-build": lambda a, out: ["data", "build", "codesearch-py", "--out", out],
    "bench": lambda a, out: ["bench", "--suite", str(a["suite"]), "--systems", "bm25", "--out", out,
                             "--device", "cpu"],
}
# the input each verb reads from inside a dir (a --out holding it must be refused), and another kind of ours
HOLDS_INPUT = {"index-build": "corpus", "train": "pairs", "bench": "suite", "index-merge": "index"}
OTHER_KIND = {"index-build": "towers", "index-merge": "towers", "train": "index", "data-build": "index",
              "bench": "index"}


def _victim(case: str, verb: str, art: dict[str, Path], tmp: Path, monkeypatch) -> tuple[str, Path, str]:
    """(--out value, the path whose bytes must survive, regex the error must match)."""
    if case == "file":
        victim = tmp / "notes.txt"
        victim.write_text("my notes")
        return str(victim), victim, r"is a file"
    if case == "foreign-dir":
        victim = tmp / "project"
        (victim / "src").mkdir(parents=True)
        (victim / "src" / "main.py").write_text("print('keep me')")
        return str(victim), victim, r"non-empty directory that twotower did not make"
    if case == "cwd":
        victim = tmp / "work"
        victim.mkdir()
        (victim / "data.txt").write_text("keep me")
        monkeypatch.chdir(victim)
        return ".", victim, r"is the current directory"
    if case == "above-cwd":
        victim = tmp / "home"
        (victim / "me").mkdir(parents=True)
        (victim / "me" / "todo.txt").write_text("keep me")
        monkeypatch.chdir(victim / "me")
        return "..", victim, r"holding the current directory"
    if case == "root":
        return "/", Path("/etc/hostname") if Path("/etc/hostname").exists() else Path("/"), r"filesystem root"
    if case == "holds-input":
        src = art[HOLDS_INPUT[verb]]
        victim = tmp / "inputs"
        shutil.copytree(src.parent if src.is_file() else src, victim / src.name if src.is_dir() else victim)
        return str(victim), victim, r"holds the input"
    if case == "other-kind":
        victim = tmp / OTHER_KIND[verb]
        shutil.copytree(art[OTHER_KIND[verb]], victim)
        return str(victim), victim, r"is (an INDEX|a TOWERS) dir"
    raise AssertionError(case)


CASES = ["file", "foreign-dir", "cwd", "above-cwd", "root", "holds-input", "other-kind"]


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize("case", CASES)
def test_output_dir_that_is_not_ours_is_refused_and_left_intact(verb, case, art, tmp_path, monkeypatch, capsys):
    if case == "holds-input" and verb not in HOLDS_INPUT:
        pytest.skip(f"{verb} reads no local input")
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))  # data build must not reach a cache or network
    argv_make = VERBS[verb]
    if case == "holds-input":  # the command reads its input from inside the victim
        out, victim, message = _victim(case, verb, art, tmp_path, monkeypatch)
        moved = {**art, HOLDS_INPUT[verb]: victim / art[HOLDS_INPUT[verb]].name}
        argv = argv_make(moved, out)
    else:
        out, victim, message = _victim(case, verb, art, tmp_path, monkeypatch)
        argv = argv_make(art, out)
    before = snapshot(victim)
    rc, err = run(argv, capsys)
    assert rc == 2, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert re.match(r"twotower \w+: error: ", line) and re.search(message, line), line
    assert "--out" in line, line
    assert snapshot(victim) == before, f"{victim} changed"


def test_demo_refuses_a_work_dir_it_did_not_make(tmp_path, capsys):
    work = tmp_path / "runs" / "codesearch-py-cpu-small"
    work.mkdir(parents=True)
    (work / "thesis.tex").write_text("keep me")
    before = snapshot(work)
    rc, err = run(["demo", "--workdir", str(tmp_path / "runs"), "--device", "cpu"], capsys)
    assert rc == 2 and "demo dir" in err and "did not make" in err, err
    assert snapshot(work) == before


def test_mine_refuses_to_write_over_its_input(art, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    shutil.copy(art["pairs"], pairs)
    before = snapshot(pairs)
    for out, message in ((pairs, "is the input --pairs"), (tmp_path, "is a directory")):
        rc, err = run(["mine", "--towers", str(art["towers"]), "--pairs", str(pairs), "--out", str(out),
                       "--no-progress", "--device", "cpu"], capsys)
        assert rc == 2 and message in err and "Traceback" not in err, err
    assert snapshot(pairs) == before


# ---- --work-dir -------------------------------------------------------------------------------------------
def _build(art: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["index", "build", "--towers", str(art["towers"]), "--corpus", str(art["corpus"]), "--out", str(out),
            "--device", "cpu", "--no-progress", *extra]


@pytest.mark.parametrize("where, message", [
    ("foreign", r"non-empty directory that twotower did not make \(no \.twotower-work file\)"),
    ("equal", r"--work-dir '.*' is the output"),
    ("inside", r"--work-dir '.*' is inside the output"),
    ("holds", r"--work-dir '.*' holds the output"),
])
def test_work_dir_not_ours_or_overlapping_the_output_is_refused(where, message, art, tmp_path, capsys):
    out = tmp_path / "runs" / "idx"
    work = {"foreign": tmp_path / "scratch", "equal": out, "inside": out / "work", "holds": tmp_path / "runs"}[where]
    if where in ("foreign", "holds"):
        work.mkdir(parents=True, exist_ok=True)
        (work / "keep.txt").write_text("keep me")
    before = snapshot(tmp_path)
    rc, err = run(_build(art, out, "--work-dir", str(work)), capsys)
    assert rc == 2 and re.search(message, err) and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_a_foreign_dir_where_the_default_work_dir_goes_is_never_deleted(art, tmp_path, capsys):
    out = tmp_path / "idx"
    (tmp_path / ".idx.work").mkdir()
    (tmp_path / ".idx.work" / "keep.txt").write_text("keep me")
    rc, err = run(_build(art, out), capsys)
    assert rc == 2 and "did not make" in err, err
    assert (tmp_path / ".idx.work" / "keep.txt").read_text() == "keep me" and not out.exists()


def test_work_dir_of_ours_is_marked_reused_and_deleted(art, tmp_path, capsys):
    out, work = tmp_path / "idx", tmp_path / "w"
    assert run(_build(art, out, "--work-dir", str(work), "--keep-work"), capsys)[0] == 0
    assert (work / ".twotower-work").is_file()
    assert run(_build(art, tmp_path / "idx2", "--work-dir", str(work)), capsys)[0] == 0  # reused, then deleted
    assert not work.exists()


# ---- symlinked outputs: blue/green ------------------------------------------------------------------------
def _live_ids(index_dir: Path) -> list[str]:
    from twotower.index.load import load_index

    index = load_index(index_dir, "cpu")
    removed = set(index.removed.tolist())
    return [d for i, d in enumerate(index.docs["id"]) if i not in removed]


def _no_temp_left(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".lock")]
    assert not left, left


def test_symlinked_index_is_followed_and_the_link_swapped(art, tmp_path, capsys):
    shutil.copytree(art["index"], tmp_path / "index-v7")
    current = tmp_path / "current"
    current.symlink_to("index-v7")  # relative, as `ln -s index-v7 current` makes it
    before = snapshot(tmp_path / "index-v7")
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"_id": "fresh", "text": "a brand new doc"}) + "\n")

    rc, err = run(["index", "add", str(current), "--corpus", str(new), "--device", "cpu", "--no-progress"], capsys)
    assert rc == 0, err
    assert current.is_symlink(), "the link must stay a link"
    target = os.readlink(current)
    assert not os.path.isabs(target) and re.fullmatch(r"index-v7\.\d{8}T\d{6}(-\d+)?", target), target
    assert snapshot(tmp_path / "index-v7") == before, "the previous version is kept as it was"
    assert "fresh" in _live_ids(current) and "fresh" not in _live_ids(tmp_path / "index-v7")
    assert f"'{current}' now points to" in err
    _no_temp_left(tmp_path)

    rc, err = run(["index", "remove", str(current), "--ids", "fresh"], capsys)
    assert rc == 0, err
    assert current.is_symlink() and "fresh" not in _live_ids(current)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("index-v7.")]) == 2
    _no_temp_left(tmp_path)

    rc, err = run(_build(art, current, "--overwrite"), capsys)  # a rebuild through the link
    assert rc == 0, err
    assert current.is_symlink() and len(_live_ids(current)) == 8
    _no_temp_left(tmp_path)


def test_dangling_link_gets_its_target_built(art, tmp_path, capsys):
    (tmp_path / "next").symlink_to("index-v8")
    rc, err = run(_build(art, tmp_path / "next"), capsys)
    assert rc == 0, err
    assert (tmp_path / "next").is_symlink() and (tmp_path / "index-v8" / "manifest.json").is_file()
    _no_temp_left(tmp_path)


def test_atomic_dir_never_replaces_a_file_or_the_current_dir(tmp_path, monkeypatch):
    from twotower.common.atomic import atomic_dir

    victim = tmp_path / "f"
    victim.write_text("keep")
    with pytest.raises(FileExistsError, match="is a file"), atomic_dir(victim):
        pass
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current directory"), atomic_dir("."):
        pass
    assert victim.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# ---- what is recognised as ours ----------------------------------------------------------------------------
def test_artefacts_are_recognised_by_their_stage_markers(art, tmp_path, capsys):
    from twotower.common.outputs import DEMO_MARKER, WORK_MARKER, artefact_kind
    from twotower.eval.demo import run_demo  # noqa: F401  (the module that writes DEMO_MARKER)
    from twotower.index.shard import SHARD_KIND, SHARD_MANIFEST
    from twotower.index.store import MANIFEST
    from twotower.towers.checkpoint import CKPT_DIR, LOG_NAME

    assert (MANIFEST, SHARD_MANIFEST, SHARD_KIND, CKPT_DIR, LOG_NAME) == (
        "manifest.json", "shard.json", "twotower-index-shard", "checkpoints", "train_log.jsonl")
    assert WORK_MARKER.startswith(".") and DEMO_MARKER.startswith(".")
    assert artefact_kind(art["index"]) == "index" and artefact_kind(art["towers"]) == "towers"
    assert artefact_kind(art["suite"]) is None  # a hand-made BEIR folder has no checksums.json: not ours
    report = tmp_path / "report"
    assert run(["bench", "--suite", str(art["suite"]), "--systems", "bm25", "--out", str(report),
                "--device", "cpu"], capsys)[0] == 0
    assert artefact_kind(report) == "report"
    assert run(["bench", "--suite", str(art["suite"]), "--systems", "bm25", "--out", str(report),
                "--device", "cpu"], capsys)[0] == 0, "a report of ours is replaced"
    shards = tmp_path / "shards"
    assert run(["index", "build", "--towers", str(art["towers"]), "--corpus", str(art["corpus"]), "--out",
                str(shards), "--shard-id", "0", "--num-shards", "2", "--device", "cpu", "--no-progress"],
               capsys)[0] == 0
    assert artefact_kind(shards) == "shards" and artefact_kind(next(shards.iterdir())) == "shard"
    foreign = tmp_path / "webapp"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "my app", "icons": []}')
    assert artefact_kind(foreign) is None, "a web app manifest is not an INDEX manifest"


# ---- permissions -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_published_dirs_and_files_follow_the_umask(umask, dir_mode, file_mode, art, tmp_path, capsys):
    old = os.umask(umask)
    try:
        index, towers = tmp_path / "idx", tmp_path / "towers"
        assert run(_build(art, index), capsys)[0] == 0
        assert run(["train", "--pairs", str(art["pairs"]), "--out", str(towers), "--base", str(art["base"]),
                    "--batch-size", "2", "--max-steps", "1", "--device", "cpu", "--checkpoint-every", "0"],
                   capsys)[0] == 0
    finally:
        os.umask(old)
    for root in (index, towers):
        for p in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode == (dir_mode if p.is_dir() else file_mode), f"{p}: {oct(mode)}"
