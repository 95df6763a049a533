"""Write-to-temp-then-rename helpers: a crash never leaves half an artefact under the final name."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``dest``; on success it replaces ``dest``, on error it is deleted.

    An existing ``dest`` stays intact until the new one is complete (it is swapped out, then removed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
