"""One writer at a time per output dir: an exclusive ``flock`` on a lock file beside it.

``index add``, ``index remove``, ``index build`` and ``index merge`` of one INDEX dir each read the current
version, make a new one and publish it; two at once would both start from the same version and the second
publish would drop the first one's change. The lock file sits *beside* the dir (``.NAME.lock``), not in it:
publishing swaps the dir itself, and a lock inside would be on the old inode. The holder writes its pid into
the file, so a refused writer can say who holds it, and deletes it when done (while still holding the lock; a
waiter that opened the deleted file notices and locks the new one). The kernel drops the lock when its process
dies (even by SIGKILL), so a crash never leaves it stuck, only a stale file that the next writer takes over.

A symlinked dir (``current -> index-v7``) is locked under both names, link then target, so writers that use
either name exclude each other.
"""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

POLL_S = 0.05  # how often a waiting writer retries


class Busy(OSError):
    """Another process holds the lock (a user error: one line, exit 2)."""


def lock_path(dest: str | Path) -> Path:
    """The lock file of ``dest``: ``.NAME.lock`` in its (resolved) parent dir."""
    dest = Path(dest)
    return dest.absolute().parent.resolve() / f".{dest.name}.lock"


@contextmanager
def exclusive(dest: str | Path, wait: float = 0.0, what: str = "index") -> Iterator[None]:
    """Hold the writer lock of ``dest`` for the block.

    Args:
        wait: seconds to wait for another writer to finish (0: refuse at once).
        what: the kind of dir, for the message ("index X is being written by pid N").

    Raises:
        Busy: another process still holds the lock after ``wait`` seconds.
    """
    dest = Path(dest)
    names = [dest] + ([dest.resolve()] if dest.is_symlink() else [])
    with ExitStack() as stack:
        deadline = time.monotonic() + max(wait, 0.0)
        for name in names:
            stack.enter_context(_hold(lock_path(name), dest, deadline, what))
        yield


@contextmanager
def _hold(path: Path, dest: Path, deadline: float, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _flock(fd, dest, deadline, what)
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have deleted the file after we opened it: then lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiter that opened this file retries
        os.close(fd)  # releases the flock


def _flock(fd: int, dest: Path, deadline: float, what: str) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise Busy(_busy_message(fd, dest, what)) from None
            time.sleep(POLL_S)


def _busy_message(fd: int, dest: Path, what: str) -> str:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
    who = f"pid {holder}" if holder.isdigit() else "another process"
    return (f"{what} '{dest}' is being written by {who}; wait for it to finish, or pass --wait SECONDS to wait "
            f"for it")
