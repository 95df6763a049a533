"""Write-to-temp-then-rename helpers: a crash never leaves half an artefact under the final name.

Published dirs and files get the permissions the umask gives any new file (0755 / 0644 under umask 022), not
the private 0700 / 0600 of ``mkdtemp`` / ``mkstemp`` (or of writers such as safetensors): a service user must
be able to read an INDEX dir.

A ``dest`` that is a symlink (the blue/green layout ``current -> index-v7``) is followed, never replaced by a
dir: the new version is written beside the link's target (``index-v7.20250101T120000``) and the link is
swapped to it in one atomic rename; the previous target is kept (a server may still be reading it).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twotower.common.jsonl import dumps_strict


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``dest``; on success it replaces ``dest``, on error it is deleted.

    An existing ``dest`` stays intact until the new one is complete (it is swapped out, then removed). A
    symlinked ``dest`` is followed (see the module doc). A ``dest`` that is a file, the filesystem root, or
    the current directory (or one holding it) is refused before anything is written.
    """
    dest = Path(dest)
    link = dest if dest.is_symlink() else None
    target = dest.resolve() if link is not None else dest
    _refuse_unreplaceable(dest, target)
    publish_at = _next_version(target) if link is not None and target.exists() else target
    publish_at.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{publish_at.name}.tmp-", dir=publish_at.parent))
    try:
        yield tmp
        apply_umask(tmp)
        fsync_tree(tmp)
        _publish(tmp, publish_at)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        os_error = os_error_of(exc, publish_at)
        if os_error is not None:
            raise os_error from exc
        raise
    if link is not None and publish_at != target:
        swap_link(link, publish_at)
        print(f"'{link}' now points to '{publish_at}'; the previous version '{target}' is kept (delete it when "
              f"nothing reads it any more)", file=sys.stderr)


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # safetensors (Rust std::io::Error)
# Errors of the machine that writers written in C/C++/Rust (faiss, safetensors, Arrow) report only as text.
MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES)


def os_error_of(exc: BaseException, path: Path) -> OSError | None:
    """The OSError (errno, its text, ``path``) behind a library's write error that is not one (safetensors'
    ``SafetensorError: ... (os error 28)``, faiss' ``RuntimeError: ... write error in ... (No space left on
    device)``), so a full disk is one line naming the path like any OSError; None for anything else (an
    OSError stays as it is, a bug keeps its traceback)."""
    if isinstance(exc, OSError) or not isinstance(exc, Exception):
        return None
    text = str(exc)
    found = _RUST_OS_ERROR.search(text)
    code = int(found.group(1)) if found else next((e for e in MACHINE_ERRNOS if f"({os.strerror(e)})" in text), None)
    return None if code is None else OSError(code, os.strerror(code), str(path))


def _refuse_unreplaceable(dest: Path, target: Path) -> None:
    """Refuse to publish a dir over a file, the filesystem root or the current directory (or one above it)."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"'{dest}' is a file, not a directory; twotower never replaces a file with a "
                              f"directory")
    resolved, cwd = target.resolve(), Path.cwd().resolve()
    if resolved.parent == resolved:
        raise ValueError(f"'{dest}' is the filesystem root; twotower never replaces it: choose a new directory")
    if cwd.is_relative_to(resolved):
        raise ValueError(f"'{dest}' is the current directory or holds it; twotower never replaces it: choose a new "
                         f"directory")


_VERSION_SUFFIX = re.compile(r"\.\d{8}T\d{6}(-\d+)?$")


def _next_version(target: Path) -> Path:
    """A fresh sibling of ``target`` for its next version: ``NAME.YYYYmmddTHHMMSS`` (``-N`` on a clash), the
    timestamp of an earlier version replaced rather than appended."""
    base = _VERSION_SUFFIX.sub("", target.name)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    candidate, n = target.with_name(f"{base}.{stamp}"), 1
    while candidate.exists() or candidate.is_symlink():
        candidate, n = target.with_name(f"{base}.{stamp}-{n}"), n + 1
    return candidate


def swap_link(link: Path, new_target: Path) -> None:
    """Point symlink ``link`` at ``new_target`` in one atomic rename (readers see the old or the new target,
    never no link); a relative link stays relative."""
    old_text = os.readlink(link)
    text = os.path.relpath(new_target, link.parent.resolve()) if not os.path.isabs(old_text) else str(new_target)
    tmp = link.with_name(f".{link.name}.tmp-{uuid.uuid4().hex[:8]}")
    os.symlink(text, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h: atomically swap two existing paths
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths with Linux ``renameat2(RENAME_EXCHANGE)``.

    Returns False where the system or filesystem does not support it (the caller falls back).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


def _publish(tmp: Path, dest: Path, attempts: int = 5) -> None:
    """Move finished ``tmp`` to ``dest``; an existing ``dest`` is replaced and then deleted.

    Where Linux offers ``renameat2(RENAME_EXCHANGE)`` the two dirs are swapped in one atomic step, so a kill
    at any instant leaves a whole dir (old or new) under ``dest``. Elsewhere the old dir is renamed aside
    first (``.NAME.old-*``: a kill between the two renames leaves it there, whole). Retried because another
    process may publish the same ``dest`` meanwhile (two jobs building one cached artefact): last writer wins.
    """
    for _ in range(attempts):
        if dest.exists() and _exchange(tmp, dest):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old dir
            return
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.replace(dest, old)
            except FileNotFoundError:  # someone else swapped it out first
                old = None
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
            continue  # a concurrent writer published in between: swap theirs out and retry
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(f"could not publish {dest}: it kept being replaced by another process")


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` to disk so a rename publishes complete data."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def apply_umask(path: Path) -> None:
    """Give ``path`` and everything under it the modes the umask gives new files (dirs 0777, files 0666, minus
    the umask): mkdtemp makes the top dir 0700, and some writers (safetensors) make their files 0600."""
    mask = current_umask()
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            entry = os.path.join(root, name)
            if not os.path.islink(entry):  # a link has no mode of its own; its target is not ours to change
                os.chmod(entry, mode & ~mask)


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``); elsewhere
    set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + rename, with the umask's mode (0644 under 022). A
    symlinked ``path`` is followed: its target is replaced, the link kept."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())  # mkstemp makes it 0600
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """``obj`` as strict JSON (NaN/Infinity written as null, see ``common.jsonl.dumps_strict``), atomically."""
    write_bytes_atomic(path, (dumps_strict(obj, indent=2, sort_keys=True) + "\n").encode())
