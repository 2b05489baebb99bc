"""How long a training run will take on this machine, said before step 1.

The estimate comes from a short probe of the run's own configuration: a
throw-away `_core.Trainer` of the same shape, batch, sequence length and
thread count takes a step on random tokens (untimed: it touches freshly
allocated memory), then at least PROBE_MIN_STEPS timed steps, more while
they fit in PROBE_BUDGET_S (their median is the step time), and one timed
validation batch. Why a probe and
not a FLOP model calibrated once per machine: this trainer's speed per FLOP
changes with the shape (small matrices, the attention's share, the output
layer's chunks), the thread layout and the load on the machine at the time,
all of which a probe of the real config measures and a cached calibration
would not; it costs a few steps (seconds for the presets up to `seed`).

A whole run is then its steps times the step time plus its validations
(`eval_interval`, and one at the end) times theirs. Shapes that were not
probed, such as the smaller one the advice proposes, are scaled from the
probe by their training FLOPs per token, 6N + 6LTC (Kaplan et al. 2020).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from crystalline import _core
from crystalline.config import ModelConfig, TrainConfig
from crystalline.precision import resolve as resolve_precision

# Timed steps the probe always takes, and the seconds it may spend on more.
PROBE_MIN_STEPS = 2
PROBE_BUDGET_S = 3.0
PROBE_MAX_STEPS = 10
# A run longer than this gets advice on how to shorten it.
LONG_S = 3600.0


@dataclass(frozen=True)
class Probe:
    """What a short run of a config's steps measured."""

    step_s: float  # seconds per optimizer step (the median of the timed steps: a moment's load spike is not the run's)
    eval_s: float  # seconds per validation batch of the same size
    steps: int  # steps timed
    threads: int  # sphere threads it ran on
    wall_s: float  # the whole probe, set-up and untimed step included

    @property
    def source(self) -> str:
        return (f"timed: {self.steps} steps of this config on {self.threads} threads here, "
                f"a {self.wall_s:.1f} s probe")


def probe(model: ModelConfig, batch_size: int, seq_len: int, threads: int, cores: int | None = None,
          seed: int = 0, precision: str = "fp32") -> Probe:
    """Time steps and a validation batch of `model` at this batch size,
    sequence length, thread and core count (None: every core) and matmul
    precision ("fp32" or "bf16"), on random tokens (the weights are thrown away)."""
    start = time.perf_counter()
    trainer = _core.Trainer(**asdict(model), threads=threads, cores=cores, seed=seed)
    trainer.set_precision(precision)
    batch = np.random.default_rng(seed).integers(0, model.vocab_size, (batch_size, seq_len + 1), dtype=np.int64)
    lr = 1e-6  # the probe's weights are never used: any finite step will do
    trainer.step(batch, lr)
    times: list[float] = []
    while len(times) < PROBE_MIN_STEPS or (sum(times) < PROBE_BUDGET_S and len(times) < PROBE_MAX_STEPS):
        t0 = time.perf_counter()
        trainer.step(batch, lr)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    trainer.eval(batch)
    eval_s = time.perf_counter() - t0
    return Probe(step_s=statistics.median(times), eval_s=eval_s, steps=len(times), threads=threads,
                 wall_s=time.perf_counter() - start)


def steps_per_epoch(cfg: TrainConfig, train_tokens: int) -> int:
    """Optimizer steps in one pass over `train_tokens` tokens."""
    return max(0, (train_tokens - 1) // cfg.seq_len) // cfg.batch_size


def planned_steps(cfg: TrainConfig, train_tokens: int) -> int | None:
    """The steps a run of `cfg` takes: its epochs, cut at max_steps; None
    for a --watch run without max_steps (until Ctrl-C)."""
    if cfg.watch:
        return cfg.max_steps
    planned = steps_per_epoch(cfg, train_tokens) * cfg.epochs
    return min(planned, cfg.max_steps) if cfg.max_steps else planned


def for_run(cfg: TrainConfig, train_tokens: int, val_tokens: int, done: int = 0) -> Estimate:
    """Probe `cfg` and estimate its run over these token counts, `done`
    steps of it already taken."""
    total = planned_steps(cfg, train_tokens)
    windows = min(max(0, (val_tokens - 1) // cfg.seq_len), cfg.eval_batches * cfg.batch_size)
    timed = probe(cfg.model_config(), cfg.batch_size, cfg.seq_len, cfg.threads, cfg.cores, cfg.seed,
                  resolve_precision(cfg.precision))
    return Estimate(timed,
                    steps_per_epoch(cfg, train_tokens), None if total is None else total - done, done,
                    cfg.eval_interval, math.ceil(windows / cfg.batch_size))


@dataclass(frozen=True)
class Estimate:
    """A run's expected wall time from a probe of its config."""

    probe: Probe
    steps_per_epoch: int
    total_steps: int | None  # the steps left to take; None: open-ended (a --watch run)
    done: int  # steps taken before (a resumed run)
    eval_interval: int
    val_batches: int  # batches of one validation

    def seconds(self, steps: int) -> float:
        """`steps` steps and the validations they include."""
        evals = steps // self.eval_interval + 1 if self.val_batches else 0
        return steps * self.probe.step_s + evals * self.val_batches * self.probe.eval_s

    @property
    def epoch_s(self) -> float:
        return self.seconds(self.steps_per_epoch)

    @property
    def run_s(self) -> float | None:
        return None if self.total_steps is None else self.seconds(self.total_steps)

    def lines(self, tokens_per_step: int) -> list[str]:
        """The estimate in words, naming its source."""
        rate = tokens_per_step / self.probe.step_s
        if self.total_steps is None:
            run = "the run is open-ended"
        elif self.done:
            run = f"the rest of the run ({self.total_steps:,} of {self.done + self.total_steps:,} steps) about " \
                  f"{duration(self.run_s)}"
        else:
            run = f"whole run ({self.total_steps:,} steps) about {duration(self.run_s)}"
        return [f"{self.probe.step_s:.3g} s/step, {rate:,.0f} tokens/s; one epoch ({self.steps_per_epoch:,} steps) "
                f"about {duration(self.epoch_s)}, {run}",
                f"estimate source: {self.probe.source}"]


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward and backward of its
    multiply-add) plus the attention's 6 L T C; position embeddings are
    looked up, not multiplied."""
    weights = model.num_parameters() - model.block_size * model.n_embd
    return 6.0 * weights + 6.0 * model.n_layer * seq_len * model.n_embd


def critical_path(threads: int, cores: int, batch_size: int, seq_len: int) -> float:
    """Sequences per core on the busiest lane of a step's plan (`_core.plan_teams`):
    its time, were every team to split its work perfectly."""
    plan = _core.plan_teams(threads=threads, cores=cores, batch_size=batch_size, seq_len=seq_len)
    return max(quota / team for quota, team in zip(plan["quota"], plan["cores"]) if quota)


def advice(est: Estimate, model: ModelConfig, seq_len: int, threads: int, batch_size: int,
           smaller: ModelConfig | None, cores: int | None = None) -> list[str]:
    """When the run (or, open-ended, an epoch) is longer than LONG_S, what
    would shorten it, with figures: `smaller` (the shape the data supports,
    scaled by FLOPs) when it is smaller, and twice the cores (`cores`, None:
    all of this machine's), scaled by the plan's critical path."""
    total = est.run_s if est.run_s is not None else est.epoch_s
    if total < LONG_S:
        return []
    what = "the run" if est.run_s is not None else "an epoch"
    out = []
    if smaller is not None and flops_per_token(smaller, seq_len) < flops_per_token(model, seq_len):
        scaled = total * flops_per_token(smaller, seq_len) / flops_per_token(model, seq_len)
        out.append(f"a smaller model, the shape the data supports (--embed-dim {smaller.n_embd} --num-layers "
                   f"{smaller.n_layer} --num-heads {smaller.n_head}, {smaller.num_parameters():,} parameters), "
                   f"would take {what} about {duration(scaled)}")
    now = cores or _core.available_cores()
    more = min(2 * now, _core.MAX_THREADS)
    faster = critical_path(threads, more, batch_size, seq_len) / critical_path(threads, now, batch_size, seq_len)
    if faster < 1:
        out.append(f"more cores: on {more} instead of {now}, {what} would take about {duration(total * faster)} "
                   f"at best (the busiest lane of the step's plan, its team splitting its work perfectly)")
    return out


def duration(seconds: float) -> str:
    """`seconds` in the units that read well: <1 s, 45 s, 3 min 20 s, 12 min, 3 h 20 min, 2 d 5 h."""
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 0.5:
        return "0 s" if seconds <= 0 else "<1 s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s" if s < 600 else f"{round(s / 60)} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"
