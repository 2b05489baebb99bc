"""Finding the text files of a corpus and reading them in bounded chunks.

Walking policy:
- directories are walked recursively; symlinks are followed, but a directory
  already visited (same device and inode) is not entered again, so symlink
  loops end; a file reached twice through links is read once;
- names starting with "." are skipped below the given paths (a hidden file or
  directory named explicitly is used);
- `extensions` keeps only files with those suffixes (case-insensitive);
- empty files are skipped; a file whose first 8 KiB contain a NUL byte is
  binary and skipped;
- a file or directory we may not read is skipped with a warning; the rest goes on.

Decoding policy: text is UTF-8. Invalid bytes become U+FFFD (the replacement
character) and the file is counted in `files_with_replacements`, so a Latin-1
file costs a few odd characters instead of the whole run.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crystalline.errors import UserError

SNIFF_BYTES = 8192
# Largest piece of one file decoded and encoded at once; bigger files are cut
# at a line break (or a character boundary) into several pieces.
CHUNK_BYTES = 256 << 10


@dataclass(frozen=True)
class SourceFile:
    path: Path  # absolute path as walked
    name: str  # posix path relative to the common root of the inputs
    size: int
    mtime_ns: int


@dataclass
class WalkStats:
    hidden: int = 0
    binary: int = 0
    empty: int = 0
    unreadable: int = 0
    other_extension: int = 0
    warnings: list[str] = field(default_factory=list)

    def skipped_summary(self) -> str:
        parts = [
            f"{count} {label}"
            for count, label in (
                (self.binary, "binary"),
                (self.hidden, "hidden"),
                (self.empty, "empty"),
                (self.unreadable, "unreadable"),
                (self.other_extension, "with another extension"),
            )
            if count
        ]
        return ", ".join(parts) if parts else "nothing"


def normalize_extensions(extensions: list[str] | None) -> tuple[str, ...] | None:
    """"py", ".py" and ".PY" all mean files ending in ".py"."""
    if not extensions:
        return None
    return tuple("." + ext.lower().lstrip(".") for ext in extensions)


def walk(
    paths: list[Path], extensions: list[str] | None = None, exclude: Path | None = None
) -> tuple[list[SourceFile], WalkStats]:
    """All text files under `paths`, sorted by name, and what was skipped.
    The directory `exclude` (a dataset being written) is never entered.

    Raises UserError for a missing path or when no text file is left."""
    if not paths:
        raise UserError("no input paths given; pass files or directories of text")
    exts = normalize_extensions(extensions)
    stats = WalkStats()
    inputs = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"input path {given} does not exist")
        inputs.append(path.resolve())
    base = os.path.commonpath([str(p if p.is_dir() else p.parent) for p in inputs])

    found: dict[str, SourceFile] = {}  # real path -> file, so links don't duplicate
    visited_dirs: set[tuple[int, int]] = set()
    if exclude is not None and Path(exclude).is_dir():
        st = Path(exclude).stat()
        visited_dirs.add((st.st_dev, st.st_ino))

    def add_file(path: str, st: os.stat_result) -> None:
        if exts is not None and not path.lower().endswith(exts):
            stats.other_extension += 1
            return
        if st.st_size == 0:
            stats.empty += 1
            return
        real = os.path.realpath(path)
        if real in found:
            return
        try:
            head = _sniff(path)
        except OSError as err:
            _unreadable(stats, path, err)
            return
        if b"\0" in head:
            stats.binary += 1
            return
        name = Path(os.path.relpath(path, base)).as_posix()
        found[real] = SourceFile(Path(path), name, st.st_size, st.st_mtime_ns)

    def visit_dir(path: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in visited_dirs:
            return
        visited_dirs.add(key)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as err:
            _unreadable(stats, path, err)
            return
        for entry in entries:
            if entry.name.startswith("."):
                stats.hidden += 1
                continue
            try:
                entry_st = entry.stat()  # follows symlinks
            except OSError as err:  # broken link or no permission
                _unreadable(stats, entry.path, err)
                continue
            visit(entry.path, entry_st)

    def visit(path: str, st: os.stat_result) -> None:
        if os.path.isdir(path):
            visit_dir(path, st)
        elif os.path.isfile(path):
            add_file(path, st)

    for path in inputs:
        try:
            st = path.stat()
        except OSError as err:
            _unreadable(stats, str(path), err)
            continue
        visit(str(path), st)

    if not found:
        where = ", ".join(str(p) for p in paths)
        only = f" (only files with {', '.join(exts)} are used; see --ext)" if exts else ""
        raise UserError(f"no text files found in {where}{only}; skipped: {stats.skipped_summary()}")
    return sorted(found.values(), key=lambda f: f.name), stats


def total_bytes(paths: list[Path], extensions: list[str] | None = None, exclude: Path | None = None) -> int:
    """Bytes of the text files `walk` finds."""
    files, _ = walk(paths, extensions, exclude)
    return sum(f.size for f in files)


def _sniff(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(SNIFF_BYTES)


def _unreadable(stats: WalkStats, path: str, err: OSError) -> None:
    stats.unreadable += 1
    reason = err.strerror or type(err).__name__
    stats.warnings.append(f"skipped {path}: {reason}")


def file_hash(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class FileRead:
    """Filled in while `read_chunks` runs: the file's hash and decoding result."""

    sha256: str = ""
    replaced: bool = False


def read_chunks(path: Path, result: FileRead, chunk_bytes: int | None = None) -> Iterator[str]:
    """Yield the file's text in pieces of at most `chunk_bytes` (default
    CHUNK_BYTES) bytes.

    Pieces end at a line break where there is one, otherwise at a UTF-8
    character boundary, so no character is split. When the generator is
    exhausted, `result` holds the sha256 of the bytes and whether any invalid
    UTF-8 was replaced."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    digest = hashlib.sha256()
    data = b""
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
            data += block
            while len(data) > chunk_bytes:
                cut = _cut_point(data, chunk_bytes)
                yield _decode(data[:cut], result)
                data = data[cut:]
    if data:
        yield _decode(data, result)
    result.sha256 = digest.hexdigest()


def _cut_point(data: bytes, limit: int) -> int:
    """Length of the first piece of `data` (longer than `limit`): up to the
    last line break within `limit`, else `limit` moved back off a UTF-8
    continuation byte."""
    newline = data.rfind(b"\n", 0, limit)
    if newline >= 0:
        return newline + 1
    cut = limit
    while cut > limit - 3 and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut


def _decode(data: bytes, result: FileRead) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        result.replaced = True
        return data.decode("utf-8", errors="replace")


def builtin_corpus_paths() -> list[Path]:
    """The .py files of this Python's standard library (about 30 MB on
    CPython 3.11), without the installed third-party packages."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(Path(dirpath, name) for name in sorted(filenames) if name.endswith(".py"))
    if not files:
        raise UserError(f"no .py files found in the standard library at {stdlib}")
    return files
