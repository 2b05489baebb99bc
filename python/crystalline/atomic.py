"""Crash-safe file writes: write to a temporary name, fsync, rename, fsync the
directory. A crash or kill -9 at any moment leaves either the old file or the
new one, never half of either."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Have `write(tmp)` create the file at a temporary name beside `path`,
    then make it `path` atomically and durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
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
    rename it to `final` when the block succeeds; on failure remove it.
    `final` may already exist only as an empty directory."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            final.rmdir()
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)
