"""Write-to-temp-then-rename helpers: a crash never leaves half an artefact under the final name."""
from __future__ import annotations

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


def _publish(tmp: Path, dest: Path, attempts: int = 5) -> None:
    """Rename ``tmp`` to ``dest``, swapping out (then deleting) any existing ``dest``.

    Retried because another process may publish the same ``dest`` between our swap-out and our rename
    (two jobs building the same cached artefact); the last writer wins, and readers always see a whole dir.
    """
    for _ in range(attempts):
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
