"""Concurrent writers of one INDEX dir, with real processes: two adds both land or the second is refused,
never both "succeed" with one lost (``common.lock``)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import build_tiny_index
from twotower import cli as twotower_cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
TIMEOUT = 180  # seconds a subprocess may take on the loaded 2-core box

# Holds the writer lock of argv[1] until its stdin closes: a real second process, as another writer would be.
HOLDER = r"""
import sys
from twotower.common.lock import exclusive
with exclusive(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def index(_tiny_models, tmp_path) -> tuple[Path, Path]:
    return build_tiny_index(tmp_path, _tiny_models["bert"], n_docs=20)


def corpus(path: Path, prefix: str, n: int = 5) -> Path:
    path.write_text("".join(json.dumps({"_id": f"{prefix}{i}", "text": f"{prefix} doc number {i}"}) + "\n"
                            for i in range(n)))
    return path


def add_cmd(index_dir: Path, corpus_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "twotower.cli", "index", "add", str(index_dir), "--corpus", str(corpus_path),
            "--device", "cpu", "--no-progress", *extra]


def live_ids(index_dir: Path) -> set[str]:
    from twotower.index.load import load_index

    idx = load_index(index_dir, "cpu")
    removed = set(idx.removed.tolist())
    return {d for i, d in enumerate(idx.docs["id"]) if i not in removed}


def hold_lock(index_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(index_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=ENV, cwd=ROOT, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_at_once_naming_the_holder(index, tmp_path, capsys):
    _, idx = index
    holder = hold_lock(idx)
    try:
        before = live_ids(idx)
        for argv in (["index", "add", str(idx), "--corpus", str(corpus(tmp_path / "a.jsonl", "a")), "--device",
                      "cpu", "--no-progress"],
                     ["index", "remove", str(idx), "--ids", "doc-1"],
                     ["index", "build", "--towers", str(index[0]), "--corpus", str(tmp_path / "a.jsonl"), "--out",
                      str(idx), "--overwrite", "--device", "cpu", "--no-progress"]):
            assert twotower_cli.main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert re.fullmatch(rf"twotower index: error: index '{re.escape(str(idx))}' is being written by pid "
                                rf"{holder.pid}; wait for it to finish, or pass --wait SECONDS to wait for it",
                                err), err
        assert live_ids(idx) == before
    finally:
        holder.stdin.close()
        holder.wait(TIMEOUT)



def test_a_busy_index_is_reported_before_the_towers_load(index, tmp_path, capsys):
    """`index add` takes the writer lock before it loads the towers: with the weights gone, a busy index still
    says it is busy (the load error would come first if the towers loaded before the lock)."""
    import shutil

    towers, idx = index
    broken = tmp_path / "towers-no-weights"
    shutil.copytree(towers, broken)
    for weights in broken.rglob("*.safetensors"):
        weights.unlink()
    holder = hold_lock(idx)
    try:
        argv = ["index", "add", str(idx), "--corpus", str(corpus(tmp_path / "a.jsonl", "a")), "--towers",
                str(broken), "--device", "cpu", "--no-progress"]
        assert twotower_cli.main(argv) == 2
        assert f"is being written by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.stdin.close()
        holder.wait(TIMEOUT)
    assert twotower_cli.main(argv) == 2  # lock free: now the missing weights are what is reported
    err = capsys.readouterr().err
    assert "being written" not in err and "Traceback" not in err, err

def test_a_waiting_writer_lands_after_the_holder(index, tmp_path):
    _, idx = index
    holder = hold_lock(idx)
    waiter = subprocess.Popen(add_cmd(idx, corpus(tmp_path / "w.jsonl", "w"), "--wait", "120"), env=ENV, cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # the waiter has loaded its towers and is waiting for the lock by now (or soon will be)
    assert waiter.poll() is None, waiter.stderr.read()
    holder.stdin.close()
    holder.wait(TIMEOUT)
    assert waiter.wait(TIMEOUT) == 0, waiter.stderr.read()
    assert {f"w{i}" for i in range(5)} <= live_ids(idx)


@pytest.mark.parametrize("wait", ["120", "0"])
def test_two_concurrent_adds_both_land_or_the_second_is_refused(index, tmp_path, wait):
    _, idx = index
    before = live_ids(idx)
    a, b = corpus(tmp_path / "a.jsonl", "a"), corpus(tmp_path / "b.jsonl", "b")
    procs = [subprocess.Popen(add_cmd(idx, c, "--wait", wait), env=ENV, cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for c in (a, b)]
    results = [(p.wait(TIMEOUT), p.stderr.read()) for p in procs]
    landed = {name for name, (rc, _) in zip("ab", results) if rc == 0}
    for name, (rc, err) in zip("ab", results):
        assert rc in (0, 2), err
        if rc == 2:
            assert "is being written by pid" in err and "Traceback" not in err, err
    expected = before | {f"{name}{i}" for name in landed for i in range(5)}
    assert live_ids(idx) == expected, "a writer that reported success must have landed, and nothing else"
    if wait != "0":
        assert landed == {"a", "b"}, results


def test_add_and_remove_at_once_keep_both_changes(index, tmp_path):
    _, idx = index
    add = subprocess.Popen(add_cmd(idx, corpus(tmp_path / "n.jsonl", "n"), "--wait", "120"), env=ENV, cwd=ROOT,
                           stderr=subprocess.PIPE, text=True)
    remove = subprocess.Popen([sys.executable, "-m", "twotower.cli", "index", "remove", str(idx), "--ids", "doc-3",
                               "doc-4", "--wait", "120"], env=ENV, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert add.wait(TIMEOUT) == 0, add.stderr.read()
    assert remove.wait(TIMEOUT) == 0, remove.stderr.read()
    ids = live_ids(idx)
    assert {f"n{i}" for i in range(5)} <= ids and not {"doc-3", "doc-4"} & ids
    from twotower.index.store import read_manifest

    assert read_manifest(idx)["generation"] == 3  # build, then one generation per change


def test_the_lock_file_goes_away_and_a_killed_holder_frees_it(index):
    from twotower.common.lock import exclusive, lock_path

    _, idx = index
    holder = hold_lock(idx)
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
    holder.wait(TIMEOUT)
    with exclusive(idx, wait=0):
        assert lock_path(idx).is_file()
    assert not lock_path(idx).exists()
