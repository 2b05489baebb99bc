"""Fuzz tests, each in a child process so that a crash (a signal, an abort,
a Rust panic) fails the test instead of killing pytest: `_core` with random
dtypes, ranks, shapes, strides, ids and scalars raises only TypeError,
ValueError or MemoryError. `benches/fuzz.py --examples N` runs longer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZER = Path(__file__).with_name("fuzzing.py")


@pytest.mark.parametrize("seed", [0, 1])
def test_core_raises_only_type_value_or_memory_errors(seed):
    run = subprocess.run([sys.executable, str(FUZZER), "core", "--examples", "200", "--seed", str(seed)],
                         capture_output=True, text=True, timeout=600)
    last_call = run.stderr.strip().splitlines()[-40:]
    assert run.returncode == 0, "\n".join(last_call)
    assert "panicked" not in run.stderr
    assert "fuzzed core: 200 examples, no crash" in run.stdout
