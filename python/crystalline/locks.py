"""One writer per directory: `locked(DIR)` holds an exclusive `fcntl.flock` on
DIR/.crystalline.lock for as long as a `prepare`, `train` or `crawl` works in
DIR, so two runs never delete each other's files.

The lock belongs to the open file, so the operating system releases it when
the process ends, however it ends (kill -9 included); the PID written into
the file is only for the message a second run prints, and a stale one left
by a dead process never blocks anyone. The file itself stays: removing it
would let a third process lock a new file while the second still holds the
old one.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from crystalline.errors import UserError

LOCK_NAME = ".crystalline.lock"


class InUse(UserError):
    """Another process holds the lock on the directory."""


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the lock on `directory` (which must exist) for the block; raise
    InUse at once, without waiting, when another process holds it."""
    directory = Path(directory)
    fd = os.open(directory / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise InUse(f"{directory} is in use by {who}; wait for it to finish or use another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
