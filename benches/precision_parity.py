"""bf16 against fp32 training: the quick preset on the built-in corpus (the
Python standard library) run twice, `--precision fp32` and `--precision
bf16`, same seed and data, and the validation loss of each at the same step.
The issue's bar: bf16 ends within 1% of fp32. Also prints each run's median
tokens/s. A benchmark, not a test: it trains for minutes.

    python benches/precision_parity.py                      # the full preset (4,000 steps)
    python benches/precision_parity.py --max-steps 400      # a shorter look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from crystalline import _core


def train(precision: str, work: Path, max_steps: int | None, threads: int) -> list[dict]:
    """Train the quick preset in `precision`; its metrics.jsonl records."""
    run = work / precision
    cmd = [sys.executable, "-m", "crystalline", "train", "--preset", "quick", "--precision", precision,
           "--checkpoint-dir", str(run), "--no-progress", "--sample-tokens", "0", "--threads", str(threads)]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps), "--eval-interval", str(max(1, max_steps // 4))]
    env = {k: v for k, v in os.environ.items() if k != "CRYSTALLINE_FORCE_FP32"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=None, help="stop both runs here (default: the preset's)")
    parser.add_argument("--threads", type=int, default=12)
    args = parser.parse_args()
    if not _core.bf16_supported():
        print("skipped: this CPU lacks avx512_bf16")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        runs = {p: train(p, Path(tmp), args.max_steps, args.threads) for p in ("fp32", "bf16")}
    val = {p: {r["step"]: r["val_loss"] for r in recs if "val_loss" in r} for p, recs in runs.items()}
    tps = {p: statistics.median(r["tokens_per_s"] for r in recs) for p, recs in runs.items()}
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| step | fp32 val loss | bf16 val loss | bf16 / fp32 - 1 |")
    print("|---:|---:|---:|---:|")
    for step in sorted(set(val["fp32"]) & set(val["bf16"])):
        a, b = val["fp32"][step], val["bf16"][step]
        print(f"| {step} | {a:.4f} | {b:.4f} | {b / a - 1:+.2%} |")
    print(f"\nmedian tokens/s: fp32 {tps['fp32']:,.0f}, bf16 {tps['bf16']:,.0f} ({tps['bf16'] / tps['fp32']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
