"""Long fuzz runs: `tests/fuzzing.py` for each target (`core`: every `_core`
function and method; `cli`: every command and option) in a child process,
so that a crash shows as a signal, with N examples each; prints what each
run counted, how long it took, and the last calls before a failure.

    python benches/fuzz.py [--examples 10000] [--seed 0] [--targets core,cli] [--limit-s 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

FUZZER = Path(__file__).resolve().parent.parent / "tests" / "fuzzing.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="core,cli")
    ap.add_argument("--limit-s", default="1", help="cli: seconds one example may run before it is stopped")
    args = ap.parse_args()
    failed = 0
    for target in args.targets.split(","):
        start = time.perf_counter()
        run = subprocess.run([sys.executable, str(FUZZER), target, "--examples", str(args.examples),
                              "--seed", str(args.seed), "--limit-s", args.limit_s],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        took = time.perf_counter() - start
        if run.returncode == 0:
            print(f"{target}: {run.stdout.strip().splitlines()[-1]}; {took:.0f} s")
        else:
            failed += 1
            how = f"signal {-run.returncode}" if run.returncode < 0 else f"exit code {run.returncode}"
            print(f"{target}: FAILED ({how}) after {took:.0f} s; the last examples and the failure:")
            print("\n".join(run.stderr.strip().splitlines()[-30:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
