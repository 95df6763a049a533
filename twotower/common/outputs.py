"""Where a command may write: the one guard of every verb that writes a dir (index build/merge --out, train
--out, data build --out, bench --out, the demo's workdir, --work-dir).

A command replaces or deletes only what twotower made. It recognises its own artefacts by their marker file
(an INDEX dir by its ``manifest.json``, a TOWERS dir by ``twotower.json``, a suite by ``checksums.json``, a
REPORT dir by ``results.json`` + ``report.md``, a SHARD dir by ``shard.json``, a work dir by
``.twotower-work``); anything else that is not empty, a file, ``/``, the current directory, or a dir that holds
one of the command's inputs is refused with one line before anything is loaded or written.

The marker names are the stages' own (``index.store.MANIFEST``, ``index.shard.SHARD_MANIFEST``, ...); they are
repeated here because ``common`` imports no stage, and ``tests/test_reliability_outputs.py`` checks they agree.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

WORK_MARKER = ".twotower-work"  # in every encode work dir twotower creates
DEMO_MARKER = ".twotower-demo"  # in every demo work dir
RERANKER_KIND = "twotower-reranker"  # reranker.json's "kind" (towers.reranker.KIND)
KINDS = {  # kind -> how messages name it (with its marker)
    "index": "an INDEX dir (manifest.json)",
    "towers": "a TOWERS dir (twotower.json)",
    "reranker": "a RERANKER dir (reranker.json)",
    "run": "a training run (checkpoints/, train_log.jsonl)",
    "suite": "a suite built by `twotower data build` (checksums.json)",
    "report": "a REPORT dir (results.json, report.md)",
    "shard": "a SHARD dir (shard.json)",
    "shards": "a dir of SHARD dirs (shard-I-of-N)",
    "work": f"a twotower work dir ({WORK_MARKER})",
    "demo": f"a demo work dir ({DEMO_MARKER})",
}
_SHARDS_ENTRY = re.compile(r"^(shard-\d+-of-\d+|\.shard-\d+-of-\d+\.(work|tmp-.+|old-.+))$")
_STEP_NAME = re.compile(r"^step-\d+$")
_DEMO_ENTRIES = {"towers", "index", "report", "dev-subset.jsonl", "codesearch-py", "nq"}  # eval.demo's layout


def _json(path: Path) -> Any:
    """The JSON object in ``path``, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def _has_keys(path: Path, *keys: str) -> bool:
    obj = _json(path)
    return isinstance(obj, dict) and all(k in obj for k in keys)


def artefact_kind(path: str | Path) -> str | None:
    """Which twotower artefact the dir ``path`` is (a key of :data:`KINDS`), or None (not a dir, or foreign).

    Recognised by content, not by name: a ``manifest.json`` of a web app is not an INDEX manifest.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    if _has_keys(p / "manifest.json", "format_version", "dim", "factory", "ntotal") or (
            (p / "manifest.json").is_file() and (p / "index.faiss").is_file()):  # an INDEX with a damaged manifest
        return "index"
    if _has_keys(p / "twotower.json", "fingerprint") or (
            (p / "twotower.json").is_file() and (p / "query_tower").is_dir()):
        return "towers"
    if _has_keys(p / "reranker.json", "kind") and _json(p / "reranker.json")["kind"] == RERANKER_KIND:
        return "reranker"
    if _has_keys(p / "shard.json", "kind") and _json(p / "shard.json")["kind"] == "twotower-index-shard":
        return "shard"
    checksums = _json(p / "checksums.json")
    if isinstance(checksums, dict) and isinstance(checksums.get("params"), dict) and "suite" in checksums["params"]:
        return "suite"
    if (p / "report.md").is_file() and _has_keys(p / "results.json", "suite", "systems"):
        return "report"
    if (p / WORK_MARKER).is_file() or _has_keys(p / "state.json", "version", "encoder", "dim", "chunk_size", "dtype"):
        return "work"  # (state.json: an encode work dir made before the marker existed)
    if (p / DEMO_MARKER).is_file():
        return "demo"
    if _is_run(p):
        return "run"
    entries = os.listdir(p)
    if entries and all(_SHARDS_ENTRY.match(n) for n in entries):
        return "shards"  # SHARD dirs, their work dirs and the temp dirs of their publishing
    names = _visible(p)
    if names and names <= _DEMO_ENTRIES and all(artefact_kind(p / n) is not None for n in names if n in (
            "towers", "index", "report", "codesearch-py", "nq")):
        return "demo"  # a demo work dir made before the marker existed
    return None


def _visible(p: Path) -> set[str]:
    return {n for n in os.listdir(p) if not n.startswith(".")}


def _is_run(p: Path) -> bool:
    """A training run that has not published its towers yet: a checkpoint or a train log of ours."""
    ckpts = p / "checkpoints"
    if ckpts.is_dir() and any(_STEP_NAME.match(c.name) and ((c / "state.json").is_file() or
                                                            (c / "COMPLETE.json").is_file()) for c in ckpts.iterdir()):
        return True
    log = p / "train_log.jsonl"
    if not log.is_file():
        return False
    with open(log, "rb") as fh:
        first = fh.readline()
    try:
        record = json.loads(first)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8: not our log
        return False
    return isinstance(record, dict) and "step" in record


def is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def check_out_dir(out: str | Path, kinds: Iterable[str], *, flag: str = "--out", verb: str = "this command",
                  inputs: Mapping[str, Any] | None = None, overwrite: bool | None = None) -> Path:
    """Refuse an output dir that writing there could destroy something twotower did not make. Returns the Path.

    Accepted: a path that does not exist, an empty dir, or a dir that is one of ``kinds`` (with ``overwrite``
    False such a dir is refused too: "pass --overwrite"; None: the command decides itself, e.g. resume).

    Refused (one line naming ``flag``): a file; the filesystem root; the current directory or a dir holding
    it; a dir equal to or holding one of ``inputs`` (``{flag: path or list of paths}``; None and non-paths
    such as hub names are skipped); another kind of twotower artefact; any other non-empty dir.

    Raises:
        ValueError: a file, the root, the current directory or an input's dir. FileExistsError: a dir that is
        not ours, another kind of ours, or ours without ``overwrite``; each names the option, path and why.
    """
    kinds = tuple(kinds)
    if str(out) == "":
        raise ValueError(f"{flag} is required")
    p = Path(out)
    if p.exists() and not p.is_dir():  # (a link to nothing yet is fine: the new dir is made at its target)
        raise ValueError(f"{flag} '{out}' is a file, not a directory; twotower never replaces a file with a "
                         f"directory: choose another {flag}")
    resolved, cwd = p.resolve(), Path.cwd().resolve()
    if resolved.parent == resolved:
        raise ValueError(f"{flag} '{out}' is the filesystem root: choose a new directory")
    if cwd.is_relative_to(resolved):
        where = "the current directory" if cwd == resolved else "a directory holding the current directory"
        raise ValueError(f"{flag} '{out}' is {where}: {verb} would replace it; choose a new directory")
    for name, values in (inputs or {}).items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if not isinstance(value, (str, Path)) or str(value) == "" or not Path(value).exists():
                continue  # None, in-memory rows, a hub name: nothing on disk to protect
            given = Path(value).resolve()
            if given == resolved or given.is_relative_to(resolved):
                relation = "is" if given == resolved else "holds"
                raise ValueError(f"{flag} '{out}' {relation} the input {name} '{value}': {verb} would replace it; "
                                 f"choose another {flag}")
    if not p.is_dir() or is_empty_dir(p):
        return p
    kind = artefact_kind(p)
    if kind in kinds:
        if overwrite is False:
            raise FileExistsError(f"{flag} '{out}' already exists; pass --overwrite to replace it ({KINDS[kind]})")
        return p
    wanted = " or ".join(KINDS[k].split(" (")[0] for k in kinds)
    if kind is not None:
        raise FileExistsError(f"{flag} '{out}' is {KINDS[kind]}, not {wanted}: {verb} would replace it; choose "
                              f"another {flag}")
    raise FileExistsError(f"{flag} '{out}' is a non-empty directory that twotower did not make (not {wanted}); "
                          f"twotower only replaces what it made: choose a new or empty {flag}")


def check_out_file(out: str | Path, *, flag: str = "--out", inputs: Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> Path:
    """Refuse an output file path that is a directory, one of the command's ``inputs`` (``{flag: path}``):
    writing the output must not overwrite what the command reads, or a file that exists already (unless
    ``overwrite``: a command never replaces a file the user did not ask it to). Returns the Path."""
    if str(out) == "":
        raise ValueError(f"{flag} is required")
    p = Path(out)
    if p.is_dir():
        raise ValueError(f"{flag} '{out}' is a directory; expected a file to write")
    for name, value in (inputs or {}).items():
        if isinstance(value, (str, Path)) and str(value) and Path(value).exists() and \
                Path(value).resolve() == p.resolve():
            raise ValueError(f"{flag} '{out}' is the input {name}: writing it would overwrite what is read; choose "
                             f"another {flag}")
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise FileExistsError(f"{flag} '{out}' already exists; pass --overwrite to replace it, or choose another "
                              f"{flag}")
    return p


def check_work_dir(work: str | Path, out: str | Path | None = None, *, flag: str = "--work-dir") -> Path:
    """Refuse a work dir that twotower could not safely clear: it exists, is not empty and carries no
    :data:`WORK_MARKER` (twotower deletes its work dir when done), or it is ``out``, inside it or holds it.

    Raises:
        ValueError: naming ``flag`` and the path.
    """
    w = Path(work)
    if out is not None and str(out):
        rw, ro = w.resolve(), Path(out).resolve()
        if rw == ro or rw.is_relative_to(ro) or ro.is_relative_to(rw):
            relation = "is" if rw == ro else "is inside" if rw.is_relative_to(ro) else "holds"
            raise ValueError(f"{flag} '{work}' {relation} the output '{out}'; the work dir is cleared when the job "
                             f"ends: choose a separate directory")
    if (w.exists() or w.is_symlink()) and not w.is_dir():
        raise ValueError(f"{flag} '{work}' is a file, not a directory")
    if w.is_dir() and not is_empty_dir(w) and artefact_kind(w) != "work":
        raise ValueError(f"{flag} '{work}' is a non-empty directory that twotower did not make (no {WORK_MARKER} "
                         f"file); twotower clears its work dir when done, so give a new or empty directory")
    return w


def mark_work_dir(work: str | Path, marker: str = WORK_MARKER) -> None:
    """Create ``work`` (if needed) and put the marker in it that lets a later run reuse or delete it."""
    w = Path(work)
    w.mkdir(parents=True, exist_ok=True)
    if not (w / marker).exists():
        (w / marker).write_text("made by twotower: a later twotower run may reuse or delete this directory\n")


def remove_work_dir(work: str | Path) -> None:
    """Delete a work dir of ours (one with the marker); anything else is left alone."""
    w = Path(work)
    if artefact_kind(w) == "work":
        shutil.rmtree(w, ignore_errors=True)
