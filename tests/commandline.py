"""Running the `crystalline` command line from tests, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def cli(args: list[str], env: dict, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m crystalline ARGS` with `env`, capturing text output."""
    return subprocess.run([sys.executable, "-m", "crystalline", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


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
