"""Running the `crystalline` command line from tests, as a user would."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STARTUP_S = 60  # deadline for a server to print its address


def cli(args: list[str], env: dict, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m crystalline ARGS` with `env`, capturing text output."""
    return subprocess.run([sys.executable, "-m", "crystalline", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


@contextmanager
def started(args: list[str], env: dict, log: Path, address: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m crystalline ARGS` (a server), its output in `log`, until the
    block ends, yielding what the regex `address` (one group) finds in the
    first line that matches, and the process; then Ctrl-C must stop it with
    exit code 0 and no traceback."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "crystalline", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_S
        while not (m := re.search(address, log.read_text(), re.M)):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no address after {STARTUP_S} s:\n{log.read_text()}"
            time.sleep(0.05)
        yield m[1], proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


# Runs the command line with a file size limit: a write past it fails with
# EFBIG (SIGXFSZ ignored, as Python does anyway), as a full disk fails with ENOSPC.
LIMITED = (
    "import resource, runpy, signal, sys; limit = int(sys.argv.pop(1));"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
    "runpy.run_module('crystalline', run_name='__main__')"
)


def cli_limited(args: list[str], env: dict | None, max_file_bytes: int,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """`cli`, where no file may grow past `max_file_bytes`: writes past it fail as on a full disk."""
    return subprocess.run([sys.executable, "-c", LIMITED, str(max_file_bytes), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def train(run: Path, data: Path, env: dict, *flags: str) -> Path:
    """`crystalline train DATA FLAGS --checkpoint-dir RUN`, which must succeed; returns RUN."""
    r = cli(["train", str(data), *flags, "--checkpoint-dir", str(run)], env)
    assert r.returncode == 0, r.stderr
    return run
