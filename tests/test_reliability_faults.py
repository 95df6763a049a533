"""An I/O error at every write site (issue 24, class 2), the sites enumerated by the harness, not by hand.

Every write twotower publishes goes through ``twotower.common.atomic`` (a temp file or dir, fsynced, then renamed
into place). The harness wraps that layer's system calls (``mkdtemp``/``mkstemp``, ``fsync``, ``replace``, the
``RENAME_EXCHANGE`` swap), runs a real verb on tiny inputs once to count them, then runs it again failing the Nth
call with ENOSPC, EROFS and EIO in turn. Each fault must give exit 2 and one line naming the path and the OS
error, leave the previous state whole (every byte of the INDEX dir, or no output at all) and leave no temp dir;
``train`` keeps every checkpoint it completed. A new write site in the atomic layer is covered without a new
test. The default run takes a few sites per verb (first, last and spread between, the errnos in turn); ``-m slow``
runs every site with every errno.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PAIR_WORDS, build_tiny_index, make_corpus
from twotower import cli as twotower_cli
from twotower.common import atomic

ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EIO)
SAMPLED_SITES = 4  # per verb in the default run


class Faults:
    """Counts the atomic layer's system calls and fails call number ``fail_at`` (1-based) with ``err``."""

    def __init__(self, fail_at: int = 0, err: int = errno.EIO) -> None:
        self.fail_at, self.err = fail_at, err
        self.sites: list[tuple[str, str]] = []

    def hit(self, kind: str, path: Any) -> None:
        self.sites.append((kind, str(path)))
        if len(self.sites) == self.fail_at:
            raise OSError(self.err, os.strerror(self.err), str(path))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import tempfile

        faults = self

        class OS:
            def __getattr__(self, name: str) -> Any:
                return getattr(os, name)

            @staticmethod
            def fsync(fd: int) -> None:
                faults.hit("fsync", os.readlink(f"/proc/self/fd/{fd}"))
                os.fsync(fd)

            @staticmethod
            def replace(src: Any, dst: Any) -> None:
                faults.hit("replace", dst)
                os.replace(src, dst)

        class Tempfile:
            def __getattr__(self, name: str) -> Any:
                return getattr(tempfile, name)

            @staticmethod
            def mkdtemp(prefix: str = "", dir: Any = None, **kw: Any) -> str:
                faults.hit("mkdtemp", Path(dir or ".") / prefix)
                return tempfile.mkdtemp(prefix=prefix, dir=dir, **kw)

            @staticmethod
            def mkstemp(prefix: str = "", dir: Any = None, **kw: Any) -> tuple[int, str]:
                faults.hit("mkstemp", Path(dir or ".") / prefix)
                return tempfile.mkstemp(prefix=prefix, dir=dir, **kw)

        exchange = atomic._exchange

        def _exchange(a: Path, b: Path) -> bool:
            faults.hit("exchange", b)
            return exchange(a, b)

        monkeypatch.setattr(atomic, "os", OS())
        monkeypatch.setattr(atomic, "tempfile", Tempfile())
        monkeypatch.setattr(atomic, "_exchange", _exchange)


def snapshot(path: Path) -> dict[str, str] | None:
    """sha256 of every file under ``path`` by relative name (None: ``path`` does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def built(_tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    towers, index = build_tiny_index(root, _tiny_models["bert"], n_docs=20)
    corpus = root / "more.jsonl"
    corpus.write_text("".join(json.dumps({**d, "_id": f"new-{i}"}) + "\n" for i, d in enumerate(make_corpus(6, 1))))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": w, "positive": f"all about the {w} {w}"}) + "\n"
                             for w in PAIR_WORDS[:8]))
    return {"towers": towers, "index": index, "corpus": corpus, "pairs": pairs, "base": _tiny_models["bert"]}


# verb -> (argv given the work dir, the dir whose previous state must survive)
def _build(b: dict[str, Path], work: Path) -> tuple[list[str], Path]:
    return (["index", "build", "--towers", str(b["towers"]), "--corpus", str(b["corpus"]), "--out",
             str(work / "out"), "--device", "cpu", "--no-progress"], work / "out")


def _add(b: dict[str, Path], work: Path) -> tuple[list[str], Path]:
    return (["index", "add", str(work / "index"), "--corpus", str(b["corpus"]), "--towers", str(b["towers"]),
             "--device", "cpu", "--no-progress"], work / "index")


def _remove(b: dict[str, Path], work: Path) -> tuple[list[str], Path]:
    return ["index", "remove", str(work / "index"), "--ids", "doc-1", "doc-4"], work / "index"


def _train(b: dict[str, Path], work: Path) -> tuple[list[str], Path]:
    return (["train", "--pairs", str(b["pairs"]), "--out", str(work / "run"), "--base", str(b["base"]),
             "--batch-size", "4", "--max-steps", "2", "--checkpoint-every", "1", "--device", "cpu"], work / "run")


VERBS: dict[str, Callable[[dict[str, Path], Path], tuple[list[str], Path]]] = {
    "index-build": _build, "index-add": _add, "index-remove": _remove, "train": _train}


def _prepare(built: dict[str, Path], work: Path) -> None:
    import shutil

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(built["index"], work / "index")


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        rc = twotower_cli.main(argv)
    except SystemExit as exc:
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


def _sites(verb: str, built: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> list[tuple[str, str]]:
    work = tmp_path / "count"
    _prepare(built, work)
    faults = Faults()
    with monkeypatch.context() as m:
        faults.install(m)
        argv, _ = VERBS[verb](built, work)
        rc, err = _run(argv, capsys)
    assert rc == 0, err
    assert faults.sites, f"{verb} made no write through common.atomic"
    return faults.sites


def _check_fault(verb: str, n: int, err_no: int, built, tmp_path: Path, monkeypatch, capsys,
                 site: tuple[str, str]) -> None:
    work = tmp_path / f"{verb}-{n}-{err_no}"
    _prepare(built, work)
    argv, target = VERBS[verb](built, work)
    before = snapshot(target)
    faults = Faults(n, err_no)
    with monkeypatch.context() as m:
        faults.install(m)
        rc, err = _run(argv, capsys)
    where = f"{verb}: fault {os.strerror(err_no)} at call {n} ({site[0]} {site[1]})"
    assert rc == 2, f"{where}: exit {rc}\n{err}"
    # the one error line (progress bars on the same stream are drawn with CR; a bar may be redrawn after it)
    marker = f"twotower {argv[0]}: error: "
    errors = [s[s.index(marker):] for s in re.split(r"[\r\n]", err) if marker in s]
    assert "Traceback" not in err and len(errors) == 1, f"{where}: {err}"
    line = errors[0]
    assert os.strerror(err_no) in line and "'/" in line, f"{where}: the line names no path and error: {line}"
    assert not leftovers(work), f"{where}: temp files left: {leftovers(work)}"
    if verb == "train":
        from twotower.towers.checkpoint import check_complete

        ckpts = sorted((target / "checkpoints").glob("step-*")) if target.exists() else []
        assert all(check_complete(c) is None for c in ckpts), f"{where}: an incomplete checkpoint is left"
        assert not (target / "twotower.json").exists(), f"{where}: a TOWERS dir was published by a failed run"
    else:
        assert snapshot(target) == before, f"{where}: the previous state changed"


def _sample(sites: list[tuple[str, str]]) -> list[int]:
    n = len(sites)
    return sorted({1, n, *(1 + round(i * (n - 1) / (SAMPLED_SITES - 1)) for i in range(1, SAMPLED_SITES - 1))})


@pytest.mark.parametrize("verb", VERBS)
def test_a_fault_at_sampled_write_sites(verb, built, tmp_path, monkeypatch, capsys) -> None:
    sites = _sites(verb, built, tmp_path, monkeypatch, capsys)
    for i, n in enumerate(_sample(sites)):
        _check_fault(verb, n, ERRNOS[i % len(ERRNOS)], built, tmp_path, monkeypatch, capsys, sites[n - 1])


@pytest.mark.slow
@pytest.mark.parametrize("verb", VERBS)
def test_a_fault_at_every_write_site_with_every_errno(verb, built, tmp_path, monkeypatch, capsys) -> None:
    sites = _sites(verb, built, tmp_path, monkeypatch, capsys)
    for n in range(1, len(sites) + 1):
        for err_no in ERRNOS:
            _check_fault(verb, n, err_no, built, tmp_path, monkeypatch, capsys, sites[n - 1])


def test_the_harness_sees_every_kind_of_site(built, tmp_path, monkeypatch, capsys) -> None:
    kinds = {k for k, _ in _sites("index-add", built, tmp_path, monkeypatch, capsys)}
    assert {"mkdtemp", "mkstemp", "fsync"} <= kinds and ({"replace", "exchange"} & kinds), kinds


# ---- a real full disk inside a library writer ----------------------------------------------------------------
LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from twotower import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def test_train_out_of_space_in_safetensors_is_one_line_and_keeps_the_last_checkpoint(built, tmp_path) -> None:
    """No file may grow past 64 KiB (RLIMIT_FSIZE) while a resumed run saves its towers: the weights written by
    safetensors' Rust code fail with a real EFBIG, which used to surface as a SafetensorError traceback."""
    import subprocess
    import sys

    from twotower.towers.checkpoint import check_complete

    argv, run = _train(built, tmp_path)
    assert twotower_cli.main(argv) == 0  # a finished run; resumed, it has only its towers left to save
    step1 = snapshot(run / "checkpoints" / "step-1")
    proc = subprocess.run([sys.executable, "-c", LIMITED, str(64 << 10), *argv, "--resume"], capture_output=True,
                          text=True, timeout=300)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert line.startswith("twotower train: error: File too large: '") and str(run) in line, line
    assert check_complete(run / "checkpoints" / "step-1") is None
    assert snapshot(run / "checkpoints" / "step-1") == step1 and not leftovers(tmp_path)
