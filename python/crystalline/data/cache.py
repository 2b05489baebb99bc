"""The datasets that `train` and `size` prepare in the user's cache, listed
and cleared (`crystalline cache`), in the manner of Hugging Face's
`scan-cache` and `delete-cache`.

The cache is `prepare.default_cache_dir()`: $CRYSTALLINE_CACHE/datasets,
else $XDG_CACHE_HOME/crystalline/datasets, else ~/.cache/crystalline/datasets.
Each dataset in it is a directory named by 16 hex digits of the hash of what
it was prepared from (`prepare.SOURCE` records that). Only such a directory
whose manifest marks it as a Crystalline dataset, and which holds nothing
but the files `prepare` makes, is ever deleted; anything else in the cache
is listed as not ours and left alone. A dataset that a process is preparing
or training on (`locks.unused`) is skipped.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from crystalline import locks
from crystalline.atomic import is_temporary
from crystalline.data import prepare as prep
from crystalline.errors import UserError

ENTRY_NAME = re.compile(r"[0-9a-f]{16}")
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Entry:
    """One directory of the cache."""

    path: Path
    bytes: int  # on disk, all files
    ours: bool  # a dataset Crystalline made and nothing else: `clear` may delete it
    inputs: str  # what it was prepared from, in words
    vocab_size: int | None  # the tokenizer's vocabulary (None: not a complete dataset)
    requested_vocab_size: int | None  # what was asked for
    last_used: float  # seconds since the epoch: its last preparation or training run


def scan(root: Path | None = None) -> list[Entry]:
    """Every entry of the cache at `root` (default: the user's), least recently used first."""
    root = Path(root) if root is not None else prep.default_cache_dir()
    if not root.is_dir():
        return []
    return sorted((_entry(p) for p in root.iterdir()), key=lambda e: e.last_used)


def _entry(path: Path) -> Entry:
    files = [p for p in path.rglob("*") if p.is_file() or p.is_symlink()] if path.is_dir() else [path]
    size = sum(p.lstat().st_size for p in files)
    manifest = prep.read_manifest(path) if path.is_dir() else None
    ours = (path.is_dir() and not path.is_symlink() and ENTRY_NAME.fullmatch(path.name) is not None
            and all(_made_by_prepare(path, p) for p in files)
            and (prep.marked_manifest(path) is not None or {p.name for p in files} <= locks.LOCK_NAMES))
    used = [p.lstat().st_mtime for p in (path / prep.MANIFEST, path / locks.USERS_NAME) if p.exists()]
    return Entry(path=path, bytes=size, ours=ours, inputs=_inputs(path, manifest),
                 vocab_size=manifest["vocab_size"] if manifest else None,
                 requested_vocab_size=manifest["requested_vocab_size"] if manifest else None,
                 last_used=max(used, default=path.lstat().st_mtime))


def _made_by_prepare(root: Path, path: Path) -> bool:
    """Whether `path`, a file under dataset `root`, has a name `prepare` gives its own files."""
    parts = path.relative_to(root).parts
    if path.is_symlink():
        return False
    if len(parts) == 1:
        name = parts[0]
        return (name in {prep.MANIFEST, prep.TOKENIZER, prep.SOURCE, *locks.LOCK_NAMES}
                or prep.TOKEN_FILE.fullmatch(name) is not None or is_temporary(name))
    return (len(parts) == 4 and parts[0] == prep.SHARDS and prep.SHARD_DIR.fullmatch(parts[1]) is not None
            and (prep.SHARD_FILE.fullmatch(parts[3]) is not None or is_temporary(parts[3])))


def _inputs(path: Path, manifest: dict | None) -> str:
    try:
        source = json.loads((path / prep.SOURCE).read_text())
        exts = f" ({', '.join(source['extensions'])})" if source.get("extensions") else ""
        return " ".join(source["paths"]) + exts
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if manifest and manifest["files"]:
        files = [e["path"] for e in manifest["files"]]
        return f"{len(files):,} file(s) under {os.path.commonpath(files)}"
    return "-"


def parse_age(text: str) -> float:
    """Seconds in an age such as 30d, 12h, 2w, 90m or 45s."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m is None:
        raise UserError(f"--older-than {text!r} is not an age: give a number and a unit, s m h d or w (e.g. 30d)")
    return float(m[1]) * AGE_UNITS[m[2]]


def select(entries: list[Entry], older_than: float | None = None, now: float | None = None) -> list[Entry]:
    """The entries `clear` would delete: ours, and unused for `older_than` seconds when given."""
    now = time.time() if now is None else now
    return [e for e in entries if e.ours and (older_than is None or now - e.last_used > older_than)]


def remove(entry: Entry) -> None:
    """Delete a dataset of the cache, unless a process prepares or trains on
    it (locks.InUse) or it is not, or no longer, one Crystalline made alone
    (UserError); the lock files go last, then the directory."""
    if not entry.ours:
        raise UserError(f"{entry.path} is not a dataset crystalline made; left alone")
    with locks.unused(entry.path):
        if not _entry(entry.path).ours:  # something else appeared since the scan
            raise UserError(f"{entry.path} now holds files crystalline did not make; left alone")
        for path in [p for p in entry.path.rglob("*") if p.is_file() and p.name not in locks.LOCK_NAMES]:
            path.unlink()
        for folder in sorted((p for p in entry.path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            folder.rmdir()
        for name in locks.LOCK_NAMES:
            (entry.path / name).unlink(missing_ok=True)
    try:
        entry.path.rmdir()
    except OSError:  # a process began preparing it again just now: its files stay
        pass
