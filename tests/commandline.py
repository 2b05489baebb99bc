"""Running the `crystalline` command line from tests, as a user would."""

from __future__ import annotations

import subprocess
import sys


def cli(args: list[str], env: dict, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m crystalline ARGS` with `env`, capturing text output."""
    return subprocess.run([sys.executable, "-m", "crystalline", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)
