"""Fuzz tests, each in a child process so that a crash (a signal, an abort,
a Rust panic) fails the test instead of killing pytest: `_core` with random
dtypes, ranks, shapes, strides, ids and scalars raises only TypeError,
ValueError or MemoryError; the command line with random values for every
option of every command exits 0, 1, 2 or 130 without a traceback.
`benches/fuzz.py --examples N` runs longer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZER = Path(__file__).with_name("fuzzing.py")


def fuzz(target: str, examples: int, seed: int) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, str(FUZZER), target, "--examples", str(examples), "--seed", str(seed)],
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    last_call = run.stderr.strip().splitlines()[-40:]
    assert run.returncode == 0, "\n".join(last_call)
    assert "panicked" not in run.stderr
    assert f"fuzzed {target}: {examples} examples, no crash" in run.stdout
    return run


@pytest.mark.parametrize("seed", [0, 1])
def test_core_raises_only_type_value_or_memory_errors(seed):
    fuzz("core", 200, seed)


def test_cli_exits_0_1_2_or_130_without_a_traceback_or_signal():
    fuzz("cli", 300, 0)
