"""Guards for untrusted input: bounded reads of files the user names, the
memory a plan needs against the memory available, the core's refusals as
UserErrors, destinations that can be written, and file names that must stay
inside a directory.

Each turns what would be a crash, a hang or a traceback into one UserError
that names the input and what to change.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from crystalline.errors import UserError

# The most a settings file (--config TOML, state.json, a Hugging Face
# config.json or index) or a prompt may hold; more is refused, not read.
TEXT_LIMIT = 4 * 2**20


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB"


def _read_limited(f: BinaryIO, limit: int, what: str) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{what} is larger than {limit // 2**20} MiB; give a smaller file")
    return data


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} is not UTF-8 text ({err})") from None


def read_text(path: Path, what: str, limit: int = TEXT_LIMIT) -> str:
    """The UTF-8 text of the regular file `path` (`what` names it in
    messages: "config file x.toml"), refusing a missing file, a directory,
    a device or FIFO (which may never end) and more than `limit` bytes,
    of which at most `limit + 1` are read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO would block a plain open
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(f"{what} is not a regular file")
            with open(fd, "rb", closefd=False) as f:
                data = _read_limited(f, limit, what)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise UserError(f"{what} does not exist") from None
    except OSError as err:
        raise UserError(f"{what} cannot be read ({err.strerror or err})") from None
    return _decode(data, what)


def utf8(text: str, what: str) -> str:
    """`text`, refused when it holds bytes that are not UTF-8 (which Python
    keeps as lone surrogates in arguments and piped input)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} is not UTF-8 text") from None
    return text


def read_json(path: Path, what: str) -> object:
    """The JSON value in the file `path`, read as `read_text` reads."""
    try:
        return json.loads(read_text(path, what))
    except (ValueError, RecursionError) as err:  # too deeply nested: RecursionError
        raise UserError(f"{what} is not valid JSON ({err})") from None


def read_stdin(what: str, limit: int = TEXT_LIMIT) -> str:
    """Standard input as UTF-8 text, at most `limit` bytes (more is refused)."""
    return _decode(_read_limited(sys.stdin.buffer, limit, what), what)


def available_memory() -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable,
    capped by a cgroup v2 memory limit when one is set (what the core's own
    refusals measure against). None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    available = kib * 1024
    try:
        limit, used = (Path("/sys/fs/cgroup", name).read_text().strip() for name in ("memory.max", "memory.current"))
        available = min(available, max(int(limit) - int(used), 0))
    except (OSError, ValueError):  # no cgroup v2 limit ("max" or no files)
        pass
    return available


def ensure_memory(needed: int, what: str, change: str) -> None:
    """Refuse, naming both figures and what to `change`, when `what` needs
    more than the memory available now."""
    free = available_memory()
    if free is not None and needed > free:
        raise UserError(f"{what} needs {gib(needed)} but only {gib(free)} of memory is available; {change}")


@contextmanager
def core_refusals() -> Iterator[None]:
    """The core's refusal of a size (MemoryError naming the figure, or
    ValueError when a size overflows) as a UserError with its message."""
    try:
        yield
    except (MemoryError, ValueError) as err:
        raise UserError(str(err) or "not enough memory") from None


def check_writable(target: Path, flag: str) -> None:
    """Refuse a directory to create or fill at `target` that is a file, lies
    below a file (/dev/null/x) or on a place that denies writing."""
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {target} is a file; give a directory")
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {target} cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {target} is not writable ({probe} denies writing)")


def fresh_directory(target: Path, flag: str) -> Path:
    """`target` made absolute, refused unless it is a directory that can be
    created (or is empty) and written."""
    target = target.expanduser().absolute()
    check_writable(target, flag)
    if target.is_dir() and any(target.iterdir()):
        raise UserError(f"{target} already exists and is not an empty directory; choose a new {flag}")
    return target


@contextmanager
def writing(target: Path, flag: str) -> Iterator[None]:
    """An OSError while writing `target` (a full disk, a vanished directory)
    as a UserError naming it."""
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write {flag} {target} ({err.strerror or err})") from None


def inside(root: Path, name: object, what: str) -> Path:
    """`root / name` for a file name read from a file in `root`, refused
    unless it is a relative path that stays inside `root`, symlinks
    resolved (no absolute paths, no `..`, no link pointing out)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise UserError(f"{what}: {name!r} is not a file name")
    path = root / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{what}: {name!r} lies outside {root}; only files inside the model directory are read")
    return path
