"""Training throughput against core count: measured here, projected for big machines.

Measures tokens/s on the seed config (V=30000, C=384, L=6, NH=12, B=32,
T=128) at the default 12 sphere threads with --cores 1 and --cores 2, the
two trainers taking alternate steps in one run (medians over timed steps).

Then a time model. It measures the time of a one-sequence micro-batch on one
core, the share of it that a team cannot split (the kernels that run on one
core of the team: LayerNorms, GELU, the cross-entropy's softmax, timed one
by one on one core, so the share holds however busy the machine is), and
the time Node Zero's reduction and AdamW take here. With the planner's schedule (`_core.plan_teams`: each
lane's team and sequences) it projects the step time at 16, 32, 64 and 128
cores, with teams and without them (one core per worker sphere, so at most
11 busy), and prints the memory traffic that bandwidth limits: the weights
each lane streams per micro-batch, and Node Zero's reduction and AdamW,
which read and write every lane's gradients and the optimizer state.

    python benches/train_scaling.py [--steps 6] [--bandwidth-gbs 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from crystalline import _core

SEED = dict(vocab_size=30000, n_embd=384, n_layer=6, n_head=12, block_size=128)
B, T, THREADS = 32, 128, 12
PROJECTED_CORES = (16, 32, 64, 128)
# Bytes one float moves, and how often a pass streams the weights: forward
# reads them, backward reads them again and reads and writes the gradients.
F32 = 4
WEIGHT_STREAMS = 4
# Node Zero's passes over P floats beside the lanes' gradients: the sum's
# write, the norm's read, AdamW's 4 reads (weights, gradient, 2 moments) and 3 writes.
NODE_ZERO_STREAMS = 1 + 1 + 7


def trainer(threads: int, cores: int):
    return _core.Trainer(**SEED, threads=threads, cores=cores, seed=0, grad_clip=1.0)


def alternate(trainers: dict, b: int, steps: int) -> dict[int, list[dict]]:
    """Each trainer's step reports on the same random [b, T+1] batches, taking turns step by step."""
    rng = np.random.default_rng(0)
    reports = {k: [] for k in trainers}
    for i in range(steps + 1):  # the first step allocates: not timed
        batch = rng.integers(0, SEED["vocab_size"], size=(b, T + 1))
        for k, tr in trainers.items():
            t0 = time.perf_counter()
            r = tr.step(batch, 1e-4)
            r["wall_s"] = time.perf_counter() - t0
            if i:
                reports[k].append(r)
    return reports


def median(reports: list[dict], key) -> float:
    return statistics.median(key(r) for r in reports)


def unsplit_seconds(steps: int) -> float:
    """Median time, on one core, of the kernels of one sequence's forward and
    backward pass that a team runs on one of its cores: every LayerNorm
    (2 per block and the final one), every GELU, the cross-entropy."""
    rng = np.random.default_rng(1)
    c, v = SEED["n_embd"], SEED["vocab_size"]
    x = rng.standard_normal((T, c), dtype=np.float32)
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    h = rng.standard_normal((T, 4 * c), dtype=np.float32)
    logits = rng.standard_normal((T, v), dtype=np.float32)
    targets = rng.integers(0, v, T)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(2 * SEED["n_layer"] + 1):
            out, mean, rstd = _core.layernorm_forward(x, w, b)
            _core.layernorm_backward(out, x, w, mean, rstd)
        for _ in range(SEED["n_layer"]):
            _core.gelu_backward(h, _core.gelu_forward(h))
        _core.softmax_crossentropy(logits, targets)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    ap.add_argument("--bandwidth-gbs", type=float, default=100.0,
                    help="memory bandwidth of the projected machines, GB/s")
    args = ap.parse_args()
    params = trainer(1, 1).num_parameters()
    print(f"load average {os.getloadavg()[0]:.1f} on {_core.available_cores()} cores; seed config, "
          f"{params:,} parameters, B={B}, T={T}, --threads {THREADS}")

    runs = alternate({c: trainer(THREADS, c) for c in (1, 2)}, B, args.steps)
    print("\n| --cores | tokens/s | step s | spheres s | Node Zero s |\n|---:|---:|---:|---:|---:|")
    tok = {}
    for c, rs in runs.items():
        tok[c] = B * T / median(rs, lambda r: r["wall_s"])
        print(f"| {c} | {tok[c]:,.0f} | {median(rs, lambda r: r['wall_s']):.3f} | {median(rs, lambda r: r['compute_s']):.3f} "
              f"| {median(rs, lambda r: r['step_s'] - r['compute_s']):.3f} |")
    print(f"--cores 2 / --cores 1: {tok[2] / tok[1]:.2f}x")

    # one worker sphere on one core, one sequence a step
    one = alternate({1: trainer(2, 1)}, 1, args.steps)[1]
    seq_s = median(one, lambda r: r["spheres"][1]["busy_s"])
    serial = min(1.0, unsplit_seconds(args.steps) / seq_s)
    apply_s = median(one, lambda r: r["step_s"] - r["compute_s"])
    here_gbs = F32 * params * (1 + NODE_ZERO_STREAMS) / apply_s / 1e9
    print(f"\none sequence, forward and backward, on one core: {seq_s:.3f} s, of which {serial:.1%} in kernels a "
          f"team runs on one core; Node Zero's reduction and AdamW of one lane: {apply_s:.3f} s ({here_gbs:.1f} GB/s here)")

    def projected(cores: int, teams: bool) -> tuple[float, float, int]:
        """(step s, compute s, lanes) at `cores` cores, from the planner's schedule."""
        plan = _core.plan_teams(threads=THREADS, cores=cores if teams else min(cores, THREADS - 1),
                                batch_size=B, seq_len=T)
        compute = max(w * seq_s * (serial + (1 - serial) / k) for w, k in zip(plan["quota"], plan["cores"]))
        lanes = len(plan["cores"])
        apply = F32 * params * (lanes + NODE_ZERO_STREAMS) / (args.bandwidth_gbs * 1e9)
        return compute + apply, compute, lanes

    one_core = B * seq_s + F32 * params * (1 + NODE_ZERO_STREAMS) / (args.bandwidth_gbs * 1e9)
    print(f"\nprojected at {args.bandwidth_gbs:g} GB/s (one core: {one_core:.2f} s a step, "
          f"{B * T / one_core:,.0f} tokens/s):\n")
    print("| cores | teams | step s | tokens/s | x one core | without teams (a core per worker): step s | x one core | "
          "weight streams GB/s | Node Zero ms |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for cores in PROJECTED_CORES:
        step, compute, lanes = projected(cores, True)
        bare, _, _ = projected(cores, False)
        plan = _core.plan_teams(threads=THREADS, cores=cores, batch_size=B, seq_len=T)
        # the 12 groups' micro-batches and at most one more piece per lane the groups are split over
        streams = WEIGHT_STREAMS * F32 * params * (_core.SYMMETRY_GROUPS + lanes) / compute / 1e9
        node_zero = F32 * params * (lanes + NODE_ZERO_STREAMS) / (args.bandwidth_gbs * 1e9)
        print(f"| {cores} | {','.join(map(str, plan['cores']))} | {step:.3f} | {B * T / step:,.0f} | "
              f"{one_core / step:.1f} | {bare:.3f} | {one_core / bare:.1f} | {streams:,.0f} | {1e3 * node_zero:.0f} |")
    print("\nweight streams: what the lanes' micro-batches (12 and one more per split group at most) read and "
          f"write of the weights and gradients per second of compute, each pass streaming them {WEIGHT_STREAMS} "
          "times; above the machine's bandwidth they, not the cores, set the pace. Node Zero: the reduction of "
          "every lane's gradients, the norm and AdamW, bound by bandwidth, after the spheres finish.")


if __name__ == "__main__":
    main()
