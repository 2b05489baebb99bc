"""How close the time `crystalline train` predicts before step 1 comes to the
time the run then takes, for the tiny, small and seed presets on the
built-in corpus (the standard library's source).

    python benches/estimate.py                       # 200 steps, 30 for seed
    python benches/estimate.py --steps 100 --seed-steps 10 --presets tiny

Predicted: the run's estimate (`Trainer.estimate.run_s`: the probe's step
time times the steps, plus its validations). Actual: the wall time of the
training loop, from step 1 to the last checkpoint (checkpoint writes and
the Python around each step included, which the estimate leaves out). The
datasets are prepared once into a cache under --cache (default
/tmp/crystalline-bench-cache) and reused. Prints a Markdown table and the
load average before and after; the goal is within 15%.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from crystalline import checkpoint
from crystalline.config import build_config
from crystalline.train import Trainer


class TimedTrainer(Trainer):
    """A Trainer that records the wall time of its training loop."""

    loop_s = 0.0

    def _train_locked(self) -> None:
        start = time.perf_counter()
        super()._train_locked()
        self.loop_s = time.perf_counter() - start


def measure(preset: str, steps: int, threads: int, run_dir: Path) -> dict:
    cfg = build_config(dict(max_steps=steps, threads=threads, sample_tokens=0, progress=False,
                            checkpoint_dir=str(run_dir)), preset=preset)
    trainer = TimedTrainer(cfg)
    trainer.console.quiet = True
    trainer.run()
    est = trainer.estimate
    records = [json.loads(line) for line in (run_dir / checkpoint.METRICS).read_text().splitlines()]
    return dict(steps_s=sum(cfg.batch_size * cfg.seq_len / r["tokens_per_s"] for r in records),
                preset=preset, steps=est.total_steps, params=trainer.cfg.model_config().num_parameters(),
                probe_steps=est.probe.steps, probe_s=est.probe.wall_s, step_s=est.probe.step_s,
                predicted=est.run_s, actual=trainer.loop_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "seed"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=12)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "crystalline-bench-cache"))
    args = parser.parse_args()
    os.environ["CRYSTALLINE_CACHE"] = args.cache
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            steps = args.seed_steps if preset == "seed" else args.steps
            rows.append(measure(preset, steps, args.threads, Path(tmp) / preset))
            r = rows[-1]
            print(f"  {preset}: predicted {r['predicted']:.1f} s, actual {r['actual']:.1f} s", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| preset | parameters | steps | probe | s/step (probe) | s/step (run) | predicted s | actual s | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        error = (r["predicted"] - r["actual"]) / r["actual"]
        print(f"| {r['preset']} | {r['params']:,} | {r['steps']} | {r['probe_steps']} steps, {r['probe_s']:.1f} s "
              f"| {r['step_s']:.3f} | {r['steps_s'] / r['steps']:.3f} | {r['predicted']:.1f} | {r['actual']:.1f} | {error:+.1%} |")


if __name__ == "__main__":
    main()
