"""Crash safety under SIGKILL: real ``twotower`` processes killed mid-run, then resumed or rerun.

Two ways to pick the moment of the kill, both a real ``SIGKILL`` of a real CLI process (no cleanup code runs):

- polling: the test watches the run's files (a checkpoint marker, the number of finished embedding chunks)
  and kills as soon as they show the state wanted; used for wide windows (between training steps, between
  chunks).
- a kill hook: the CLI runs under ``python -c KILL_HOOK``, which wraps one function (``torch.save``,
  ``index.build.save_docs``, ``os.replace``...) so the process SIGKILLs itself at that exact call; used for
  windows of a few milliseconds that polling cannot hit reliably (inside a checkpoint write, inside the
  final write of an INDEX dir, between the two renames that publish it).

What must hold after any kill: a resumed training run ends with exactly the weights of an uninterrupted
one; the previous INDEX dir loads with the same manifest and the same search results; a rerun completes;
a half-written or corrupted checkpoint or chunk is never taken as complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import QUERIES
from twotower import cli as twotower_cli

ROOT = Path(__file__).resolve().parents[1]
# One thread everywhere: the in-process reference run uses one torch thread (conftest), and bitwise-equal
# weights need the same reduction order; two cores are shared, so more threads would only contend.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT)}
TIMEOUT = 120  # seconds any one subprocess may take before the test fails (a loaded 2-core box)

# Runs ``twotower ARGS`` and SIGKILLs the process itself at a chosen call:
#   KILL_AT="module:attr:N"        just before the N-th call of module.attr
#   KILL_AFTER_RENAME_TO="prefix"  just after an os.replace whose destination's name starts with prefix
KILL_HOOK = r"""
import importlib, os, signal, sys
def die():
    sys.stderr.write("kill hook: SIGKILL\n"); sys.stderr.flush(); os.kill(os.getpid(), signal.SIGKILL)
if os.environ.get("KILL_AT"):
    target, attr, nth = os.environ["KILL_AT"].split(":")
    mod, calls = importlib.import_module(target), [0]
    real = getattr(mod, attr)
    def hooked(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(nth):
            die()
        return real(*args, **kwargs)
    setattr(mod, attr, hooked)
if os.environ.get("KILL_AFTER_RENAME_TO"):
    prefix, real_replace = os.environ["KILL_AFTER_RENAME_TO"], os.replace
    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if os.path.basename(os.fspath(dst)).startswith(prefix):
            die()
    os.replace = replace
from twotower import cli as twotower_cli
sys.exit(twotower_cli.main(sys.argv[1:]))
"""


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def kill_when(args: list[str], ready: Callable[[], bool], log: Path) -> None:
    """Run ``twotower ARGS`` and SIGKILL it as soon as ``ready()`` (polled every 2 ms) is true."""
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=ENV, cwd=ROOT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"twotower {args[0]} exited ({proc.returncode}) before the kill point:\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"twotower {args[0]} did not reach the kill point within {TIMEOUT} s:\n{_tail(log)}")
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, f"the run finished before the kill:\n{_tail(log)}"


def kill_at_call(args: list[str], log: Path, **hook: str) -> None:
    """Run ``twotower ARGS`` under the kill hook (``KILL_AT=...`` or ``KILL_AFTER_RENAME_TO=...``)."""
    with log.open("wb") as out:
        proc = subprocess.run([sys.executable, "-c", KILL_HOOK, *args], stdout=out, stderr=subprocess.STDOUT,
                              env={**ENV, **hook}, cwd=ROOT, timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, f"expected the hook's SIGKILL ({hook}):\n{_tail(log)}"


def tmp_dirs(parent: Path, name: str) -> list[Path]:
    """Leftover ``.NAME.tmp-*`` dirs of an interrupted ``common.atomic.atomic_dir`` write."""
    return sorted(parent.glob(f".{name}.tmp-*"))


# ---- training -----------------------------------------------------------------------------------------
WORDS = ("apple banana cherry grape lemon mango orange peach pear plum kiwi melon lime fig date olive "
         "berry walnut corn rice bean pea oat rye").split()


def train_args(pairs: Path, out: Path, base: Path, checkpoint_every: int = 3) -> list[str]:
    # Each checkpoint of the tiny model costs ~0.3 s (24 MB of weights + Adam state, hashed and fsynced).
    return ["train", "--pairs", str(pairs), "--out", str(out), "--base", str(base), "--batch-size", "4",
            "--max-steps", "15", "--lr", "1e-3", "--warmup-ratio", "0.2", "--checkpoint-every", str(checkpoint_every),
            "--keep-checkpoints", "2", "--log-every", "1", "--eval-every", "0", "--device", "cpu",
            "--query-max-length", "16", "--result-max-length", "16"]


def losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_train_killed_mid_step_and_mid_checkpoint_resumes_to_identical_weights(tiny_bert_dir, tmp_path):
    from twotower.towers import checkpoint as ckpt
    from twotower.towers.model import TwoTower

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": w, "positive": f"all about the {w} {w}"}) + "\n" for w in WORDS))
    ref, out = tmp_path / "ref", tmp_path / "run"
    # Uninterrupted, in this process, no checkpoints (they are a resume_ok option: the maths is the same).
    assert twotower_cli.main(train_args(pairs, ref, tiny_bert_dir, checkpoint_every=0)) == 0
    ckpts = out / "checkpoints"

    # Kill 1: between steps, right after the step-6 checkpoint is complete (the next step is running).
    kill_when(train_args(pairs, out, tiny_bert_dir), lambda: (ckpts / "step-6" / ckpt.MARKER).exists(),
              tmp_path / "kill1.log")
    assert not (out / "twotower.json").exists()  # nothing published
    assert ckpt.latest_complete(ckpts) is not None

    # Kill 2: the resumed run dies inside its first checkpoint write (torch.save of trainer.pt).
    resumed_from = int(ckpt.latest_complete(ckpts).name.split("-")[1])
    kill_at_call([*train_args(pairs, out, tiny_bert_dir), "--resume"], tmp_path / "kill2.log",
                 KILL_AT="torch:save:1")
    half = tmp_dirs(ckpts, f"step-{resumed_from + 3}")
    assert half and not (half[0] / ckpt.MARKER).exists(), "the half-written checkpoint stays under a temp name"
    assert not (ckpts / f"step-{resumed_from + 3}").exists()
    newest = ckpt.latest_complete(ckpts)
    assert newest.name == f"step-{resumed_from}"

    # A corrupted complete checkpoint is never resumed from: flip bytes in its weights (same size).
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(b ^ 0xFF for b in data[-100:])
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=rf"skipping incomplete checkpoint .*{newest.name}: model.safetensors "
                                         "does not match its checksum"):
        assert twotower_cli.main([*train_args(pairs, out, tiny_bert_dir), "--resume"]) == 0

    a, b = TwoTower.load(ref).state_dict(), TwoTower.load(out).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(out) == losses(ref)  # the same 15 steps: same batches, dropout, optimizer, LR
    assert tmp_dirs(ckpts, f"step-{resumed_from + 3}") == []  # leftovers of the killed write are cleaned


# ---- indexing -----------------------------------------------------------------------------------------
def corpus_rows(n: int, start: int = 0) -> list[dict]:
    return [{"_id": f"p{i}", "title": "Title" if i % 3 == 0 else "", "text": f"passage number {i} " + "word " * (i % 7)}
            for i in range(start, start + n)]


def write_corpus(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def towers_and_index(_tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """TOWERS (tiny random BERT) and a 40-doc INDEX built from them (copied per test)."""
    from twotower.index.build import build_index
    from twotower.index.config import EncodeConfig, IndexBuildConfig
    from twotower.towers.inference import result_encoder
    from twotower.towers.model import TwoTower

    root = tmp_path_factory.mktemp("crash-index")
    towers = root / "towers"
    TwoTower.from_base(str(_tiny_models["bert"]), query_max_length=16, result_max_length=32).save(towers)
    index = build_index(result_encoder(TwoTower.load(towers), "cpu"), corpus_rows(40), root / "index",
                        IndexBuildConfig(), EncodeConfig(progress=False), towers_dir=towers)
    return towers, Path(index)


class Snapshot:
    """What a user sees of an INDEX dir: the manifest bytes and the answers to fixed query vectors."""

    def __init__(self, index_dir: Path, xq: np.ndarray) -> None:
        from twotower.index.load import load_index

        index = load_index(index_dir, "cpu")
        self.manifest = (index_dir / "manifest.json").read_bytes()
        self.ids = list(index.docs["id"])
        self.D, self.I = index.search(xq, 10)

    def assert_same(self, other: Snapshot) -> None:
        assert other.manifest == self.manifest
        assert other.ids == self.ids
        np.testing.assert_array_equal(other.I, self.I)
        np.testing.assert_array_equal(other.D, self.D)


@pytest.fixture
def index_case(towers_and_index, tmp_path):
    """(towers, a fresh copy of the INDEX dir, query vectors, snapshot of the index before any kill)."""
    from twotower.towers.model import Tower

    towers, index = towers_and_index
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    xq = Tower.load(towers / "query_tower").encode(QUERIES)
    return towers, copy, xq, Snapshot(copy, xq)


def chunk_records(work: Path) -> list[Path]:
    return sorted(work.glob("chunk-*.json"))


def build_args(towers: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["index", "build", "--towers", str(towers), "--corpus", str(corpus), "--out", str(out), "--overwrite",
            "--chunk-size", "8", "--batch-size", "8", "--device", "cpu", "--no-progress", *extra]


def test_index_build_killed_between_chunks_keeps_previous_index_and_rerun_resumes(index_case, tmp_path):
    from twotower.index.load import load_index
    from twotower.towers.model import TwoTower

    towers, idx, xq, before = index_case
    corpus = write_corpus(tmp_path / "corpus.jsonl", corpus_rows(240))
    work = tmp_path / ".idx.work"
    kill_when(build_args(towers, corpus, idx, "--keep-work"), lambda: len(chunk_records(work)) >= 3,
              tmp_path / "kill.log")
    before.assert_same(Snapshot(idx, xq))  # the previous index is untouched
    done = chunk_records(work)
    assert 3 <= len(done) < 30
    kept = {p.name: p.stat().st_ino for p in work.glob("emb-*.npy") if (work / f"chunk-{p.name[4:10]}.json").exists()}
    (work / "chunk-000001.json").unlink()  # a chunk without its completion record must be encoded again

    assert twotower_cli.main(build_args(towers, corpus, idx, "--keep-work")) == 0
    index = load_index(idx, "cpu")
    assert index.ntotal == 240 and list(index.docs["id"]) == [f"p{i}" for i in range(240)]
    model = TwoTower.load(towers)
    texts = [f"{r['title']} {r['text']}" if r["title"] else r["text"] for r in corpus_rows(240)]
    np.testing.assert_allclose(index.cpu_index.reconstruct_n(0, 240), model.encode_results(texts), atol=1e-5)
    # finished chunks were reused (same file, not rewritten); the one without a record was re-encoded
    for name, inode in kept.items():
        assert ((work / name).stat().st_ino == inode) == (name != "emb-000001.npy"), name


def test_index_build_killed_while_writing_the_index_dir_keeps_previous(index_case, tmp_path):
    from twotower.index.load import load_index

    towers, idx, xq, before = index_case
    corpus = write_corpus(tmp_path / "corpus.jsonl", corpus_rows(100))
    # index.faiss is already in the temp dir; the doc store is being written
    kill_at_call(build_args(towers, corpus, idx), tmp_path / "kill.log", KILL_AT="twotower.index.build:save_docs:1")
    before.assert_same(Snapshot(idx, xq))
    assert len(tmp_dirs(tmp_path, "idx")) == 1  # the half-written dir never got the final name
    assert twotower_cli.main(build_args(towers, corpus, idx)) == 0
    assert load_index(idx, "cpu").ntotal == 100


def _age(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and everything inside it to ``seconds`` ago."""
    then = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (then, then))


def test_leftover_temp_dirs_are_ignored_by_readers_and_listed_by_build(index_case, tmp_path, capsys):
    towers, idx, xq, before = index_case
    # What killed writes leave beside idx: a half-written new dir, an old dir swapped out, a write in progress.
    half, old, live = tmp_path / ".idx.tmp-k1ll3d", tmp_path / ".idx.old-0ld0ld00", tmp_path / ".idx.tmp-l1ve"
    shutil.copytree(idx, old)
    for d in (half, live):
        d.mkdir()
        (d / "index.faiss").write_bytes(b"half a faiss file")
        (d / "manifest.json").write_text("{")
    _age(half, 2 * 3600)
    _age(old, 30 * 3600)
    _age(live, 3000)  # 50 minutes: perhaps a slow write of a live process, not reported
    (tmp_path / ".other.tmp-x").mkdir()  # another artefact's temp dir
    _age(tmp_path / ".other.tmp-x", 5 * 3600)

    assert twotower_cli.main(["index", "info", str(idx), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ntotal"] == 40 and info["path"] == str(idx)
    before.assert_same(Snapshot(idx, xq))

    corpus = write_corpus(tmp_path / "corpus.jsonl", corpus_rows(16))
    assert twotower_cli.main(build_args(towers, corpus, idx)) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "notice:" in line]
    assert len(notices) == 1, notices
    assert re.search(rf"2 temp dir\(s\) of interrupted writes beside '{re.escape(str(idx))}', unchanged for over 1 h; "
                     rf"delete them if no twotower process is still writing there: {re.escape(str(old))} \(30\.0 h\), "
                     rf"{re.escape(str(half))} \(2\.0 h\)$", notices[0]), notices[0]
    assert half.is_dir() and old.is_dir() and live.is_dir(), "leftovers are listed, never deleted"
    assert Snapshot(idx, xq).ids == [f"p{i}" for i in range(16)]


# What every INDEX write (build --overwrite, add, remove) ends with: common.atomic.atomic_dir publishing a
# finished temp dir over the old one. Run alone (no torch import) so the kill costs a fraction of a second.
PUBLISH = r"""
import shutil, sys
from twotower.common.atomic import atomic_dir
src, dest = sys.argv[1:3]
with atomic_dir(dest) as tmp:
    for f in ("index.faiss", "manifest.json"):
        shutil.copy2(f"{src}/{f}", tmp / f)
    shutil.copytree(f"{src}/docs", tmp / "docs")
"""


def test_index_dir_killed_between_the_publishing_renames_keeps_an_index(index_case, tmp_path):
    towers, idx, xq, before = index_case
    hook = KILL_HOOK.replace("from twotower import cli as twotower_cli\nsys.exit(twotower_cli.main(sys.argv[1:]))",
                             PUBLISH)
    with (tmp_path / "kill.log").open("wb") as out:
        proc = subprocess.run([sys.executable, "-c", hook, str(idx), str(idx)], stdout=out, stderr=subprocess.STDOUT,
                              env={**ENV, "KILL_AFTER_RENAME_TO": ".idx.old-"}, cwd=ROOT, timeout=TIMEOUT)
    # The renameat2 exchange publishes in one step (no rename to .idx.old-*, so the run finishes); a publish
    # that renamed the old dir aside first would be killed with no dir under idx. idx must hold a whole index
    # (here the new one has the same content as the old).
    assert proc.returncode in (0, -signal.SIGKILL), _tail(tmp_path / "kill.log")
    before.assert_same(Snapshot(idx, xq))


def test_index_add_killed_between_chunks_keeps_previous_index_and_rerun_adds(index_case, tmp_path):
    from twotower.index.load import load_index

    towers, idx, xq, before = index_case
    new = write_corpus(tmp_path / "new.jsonl", corpus_rows(200, start=1000))
    add = ["index", "add", str(idx), "--corpus", str(new), "--chunk-size", "8", "--batch-size", "8", "--device",
           "cpu", "--no-progress"]
    work = tmp_path / ".idx.add.work"
    kill_when(add, lambda: len(chunk_records(work)) >= 2, tmp_path / "kill.log")
    before.assert_same(Snapshot(idx, xq))
    assert twotower_cli.main(add) == 0
    index = load_index(idx, "cpu")
    assert index.ntotal == 240 and list(index.docs["id"]) == before.ids + [f"p{i}" for i in range(1000, 1200)]
    assert [h["op"] for h in index.manifest["history"]] == ["build", "add"]
    assert not work.exists()


@pytest.mark.slow
def test_index_add_and_remove_killed_while_writing_keep_previous(index_case, tmp_path):
    from twotower.index.load import load_index

    towers, idx, xq, before = index_case
    new = write_corpus(tmp_path / "new.jsonl", corpus_rows(20, start=1000))
    add = ["index", "add", str(idx), "--corpus", str(new), "--device", "cpu", "--no-progress"]
    kill_at_call(add, tmp_path / "kill-add.log", KILL_AT="twotower.index.build:save_docs:1")
    before.assert_same(Snapshot(idx, xq))
    remove = ["index", "remove", str(idx), "--ids", "p1", "p2", "p3"]
    kill_at_call(remove, tmp_path / "kill-remove.log", KILL_AT="twotower.common.atomic:fsync_tree:1")
    before.assert_same(Snapshot(idx, xq))
    assert twotower_cli.main(add) == 0 and twotower_cli.main(remove) == 0
    index = load_index(idx, "cpu")
    assert index.ntotal == 60 and index.n_live == 57


def _damage_chunk(work: Path, damage: str) -> None:
    """Damage chunk 1 of an encode work dir on disk, the way a bad disk, a full disk or an old version would."""
    emb, docs, record = work / "emb-000001.npy", work / "docs-000001.arrow", work / "chunk-000001.json"
    if damage == "emb-flip":  # same size, last 64 bytes zeroed
        data = emb.read_bytes()
        emb.write_bytes(data[:-64] + bytes(64))
    elif damage == "emb-truncate":
        emb.write_bytes(emb.read_bytes()[: emb.stat().st_size // 2])
    elif damage == "docs-flip":  # one character of a passage, same size: the Arrow file still reads
        data = docs.read_bytes()
        assert b"passage number 9" in data
        docs.write_bytes(data.replace(b"passage number 9", b"passage number X"))
    elif damage == "docs-missing":
        docs.unlink()
    elif damage == "record-without-sha256":  # a work dir written before chunk records carried file hashes
        rec = json.loads(record.read_text())
        del rec["sha256"]
        record.write_text(json.dumps(rec))
    else:
        raise AssertionError(f"unknown damage {damage}")


@pytest.mark.parametrize("damage", ["emb-flip", "emb-truncate", "docs-flip", "docs-missing", "record-without-sha256"])
def test_a_damaged_chunk_is_encoded_again(towers_and_index, tmp_path, damage, capsys):
    from twotower.index.build import build_index
    from twotower.index.config import EncodeConfig, IndexBuildConfig
    from twotower.index.load import load_index
    from twotower.towers.inference import result_encoder
    from twotower.towers.model import TwoTower

    towers, _ = towers_and_index
    model = TwoTower.load(towers)
    work = tmp_path / "work"
    cfg = dict(chunk_size=8, keep_work=True, progress=False, work_dir=str(work))
    build_index(result_encoder(model, "cpu"), corpus_rows(24), tmp_path / "a", IndexBuildConfig(), EncodeConfig(**cfg))
    intact = {p.name: p.stat().st_ino for p in (work / "emb-000000.npy", work / "emb-000002.npy")}
    _damage_chunk(work, damage)
    build_index(result_encoder(model, "cpu"), corpus_rows(24), tmp_path / "b", IndexBuildConfig(), EncodeConfig(**cfg))
    a, b = load_index(tmp_path / "a", "cpu"), load_index(tmp_path / "b", "cpu")
    np.testing.assert_array_equal(b.cpu_index.reconstruct_n(0, 24), a.cpu_index.reconstruct_n(0, 24))
    assert b.docs.to_list() == a.docs.to_list()
    assert {n: (work / n).stat().st_ino for n in intact} == intact, "the undamaged chunks were reused"
    if damage != "record-without-sha256":
        assert "chunk file" in capsys.readouterr().err
    assert set(json.loads((work / "chunk-000001.json").read_text())["sha256"]) == {"emb-000001.npy",
                                                                                   "docs-000001.arrow"}
