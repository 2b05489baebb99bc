"""Crash-safe file writes: write to a temporary name, fsync, rename, fsync the
directory. A crash or kill -9 at any moment leaves either the old file or the
new one, never half of either. Temporary names are unique per process and
call, so two processes writing beside each other never clobber each other's.

A write that fails for lack of space becomes `DiskFull` (see `disk_full_at`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from crystalline.errors import UserError

# A full disk (ENOSPC), a full quota (EDQUOT), a file size limit (EFBIG).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFull(UserError):
    """A file could not be written for lack of space; what was there before is intact."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"disk full while writing {path}")
        self.path = path


def is_disk_full(err: BaseException) -> bool:
    """True for an OSError with a DISK_FULL_ERRNOS errno, or an error from
    Rust code (safetensors), whose message carries the OS error as
    "(os error N)"."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL_ERRNOS
    found = re.search(r"\(os error (\d+)\)", str(err))
    return found is not None and int(found[1]) in DISK_FULL_ERRNOS


@contextmanager
def disk_full_at(path: Path) -> Iterator[None]:
    """Raise DiskFull(path) when the block fails for lack of space."""
    try:
        yield
    except Exception as err:
        if is_disk_full(err):
            raise DiskFull(path) from err
        raise


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, `root` itself last."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process and call, ending in .tmp."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def is_temporary(name: str) -> bool:
    """Whether `name` is one `temporary_name` gives."""
    return re.fullmatch(r"\..+\.\d+-[0-9a-f]{8}\.tmp", name) is not None


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Have `write(tmp)` create the file at a temporary name beside `path`,
    then make it `path` atomically and durably."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: Path, data: dict, indent: int = 1) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=indent)))


def copy_atomic(src: Path, dst: Path) -> None:
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


@contextmanager
def new_directory(final: Path) -> Iterator[Path]:
    """Build a directory under a temporary name beside `final` (yielded) and
    rename it to `final` when the block succeeds, every file and directory
    in it fsynced first; on failure remove it. `final` may already exist
    only as an empty directory."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            final.rmdir()
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)
