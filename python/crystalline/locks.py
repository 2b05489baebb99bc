"""One writer per directory: `locked(DIR)` holds an exclusive `fcntl.flock` on
DIR/.crystalline.lock for as long as a `prepare`, `train` or `crawl` works in
DIR, so two runs never delete each other's files.

The lock belongs to the open file, so the operating system releases it when
the process ends, however it ends (kill -9 included); the PID written into
the file is only for the message a second run prints, and a stale one left
by a dead process never blocks anyone. The file itself stays: removing it
would let a third process lock a new file while the second still holds the
old one.

A process that only reads a dataset (a `train` run, from before it prepares
the data until it ends) holds `using(DIR)`: a shared lock on a second file,
DIR/.crystalline.users, that any number of readers hold at once and that
`crystalline cache clear` must take exclusively, with the writer's lock,
before it deletes DIR. Preparing takes only the writer's lock, so a `train
--watch` run can prepare its own dataset again while it reads it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from crystalline.errors import UserError

LOCK_NAME = ".crystalline.lock"
USERS_NAME = ".crystalline.users"
LOCK_NAMES = frozenset({LOCK_NAME, USERS_NAME})


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


@contextmanager
def using(directory: Path) -> Iterator[None]:
    """Mark `directory` (which must exist) as read by this process for the
    block, alongside any other readers, and record the time as its last use
    (the users file's mtime); raise InUse when it is being deleted."""
    path = Path(directory) / USERS_NAME
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUse(f"{directory} is being deleted by another process; run again to prepare it afresh") from None
        os.utime(fd)
        yield
    finally:
        os.close(fd)


@contextmanager
def unused(directory: Path) -> Iterator[None]:
    """Hold `directory` against writers and readers alike (before deleting
    it); raise InUse when a process prepares or reads it."""
    with locked(directory):
        fd = os.open(Path(directory) / USERS_NAME, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InUse(f"{directory} is in use by a training run; wait for it to finish") from None
            yield
        finally:
            os.close(fd)
