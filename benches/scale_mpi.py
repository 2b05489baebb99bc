"""Data-parallel scaling over MPI for the seed config (V=30000 C=384 L=6
H=12, global batch B=32 of T=128): measured here at K = 1 and 2 ranks, and
projected for K = 2..64 nodes at 10, 25 and 100 Gb/s.

Measured: each rank runs the core's `gradients` on its share of the batch
(compute), the in-place `Allreduce` of the float32 gradient buffer
(allreduce) and `apply` (clip + AdamW), as `crystalline train` does under
`mpiexec`; medians over the timed steps, rank 0's clock. K=1 uses 3 threads
(two workers: both cores), K=2 one thread per rank (Node Zero computes).
On one machine the allreduce goes through shared memory, not a network.

Projected: the allreduce of a ring, 2(K-1)/K x gradient bytes / bandwidth
(the bytes each node sends), against the compute time per node measured
here at K=1 (forward and backward of the whole batch: T1; every node
also runs the whole AdamW update), in two ways:
  - fixed global batch B=32: each node computes T1/K;
  - fixed per-node batch of 32 (global 32K): each node computes T1.
Efficiency is compute / (compute + exposed allreduce). Without overlap the
whole allreduce is exposed; with bucketed overlap (as PyTorch DDP) the
buckets of all but the first layers are summed while backward goes on, so
only what outlasts backward is exposed: max(0, allreduce - backward), with
backward taken as 2/3 of compute (twice the forward's matmul work). Overlap
is projected, not implemented: see README, "More than one machine".

    python benches/scale_mpi.py [--steps 3] [--ks 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SEED = dict(vocab_size=30000, n_embd=384, n_layer=6, n_head=12, block_size=128)
BATCH = 32
NODES = (2, 4, 8, 16, 64)
GBITS = (10, 25, 100)
BACKWARD_SHARE = 2 / 3  # of a step's compute


def worker(steps: int, threads: int) -> None:
    """Runs under mpiexec: time `steps` steps (after one warm-up) and print rank 0's medians as JSON."""
    from crystalline import _core
    from crystalline.cluster import connect, rows

    cluster = connect()
    trainer = _core.Trainer(**SEED, threads=threads, seed=0)
    grad = trainer.gradient()
    comm = getattr(cluster, "comm", None)
    batch = np.random.default_rng(0).integers(0, SEED["vocab_size"], size=(BATCH, SEED["block_size"] + 1))
    lo, hi = rows(cluster.rank, cluster.size, BATCH)
    times: dict[str, list[float]] = {"compute_s": [], "allreduce_s": [], "apply_s": []}
    for step in range(steps + 1):
        t0 = time.perf_counter()
        r = trainer.gradients(batch[lo:hi], batch_size=BATCH, offset=lo)
        t1 = t_passes = time.perf_counter()
        loss = r["loss_sum"]
        if comm is not None:  # timed after a barrier: the sum alone, not waiting for a slower rank
            from mpi4py import MPI

            comm.Barrier()
            t1 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, grad)
            loss = comm.allreduce(loss)
        t2 = time.perf_counter()
        trainer.apply(1e-4, loss / (BATCH * SEED["block_size"]))
        t3 = time.perf_counter()
        if step:  # the first step allocates activations
            for key, value in zip(times, (t_passes - t0, t2 - t1, t3 - t2)):
                times[key].append(value)
    if cluster.leader:
        out = {k: statistics.median(v) for k, v in times.items()}
        out.update(ranks=cluster.size, threads=threads, grad_bytes=grad.nbytes, parameters=grad.size)
        print(json.dumps(out), flush=True)


def measure(k: int, steps: int) -> dict:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    threads = 3 if k == 1 else 1
    cmd = [str(mpiexec), "-n", str(k), sys.executable, __file__, "--worker", "--steps", str(steps),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ)).stdout
    return json.loads(out.strip().splitlines()[-1])


def efficiency(passes: float, apply: float, comm: float, overlap: bool) -> float:
    """Useful time over step time for a node that spends `passes` seconds in
    forward and backward, `apply` in clip + AdamW and `comm` in the allreduce."""
    exposed = max(0.0, comm - BACKWARD_SHARE * passes) if overlap else comm
    return (passes + apply) / (passes + apply + exposed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ks", default="1,2")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.threads)
        return
    measured = [measure(int(k), args.steps) for k in args.ks.split(",")]
    print(f"seed config, global batch {BATCH} x {SEED['block_size']}; load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} cores\n")
    print("| K | threads/rank | compute s/step | allreduce s | apply s | gradient MB | ring MB sent/rank |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for m in measured:
        k, mb = m["ranks"], m["grad_bytes"] / 1e6
        print(f"| {k} | {m['threads']} | {m['compute_s']:.3f} | {m['allreduce_s']:.4f} | {m['apply_s']:.3f} | "
              f"{mb:.1f} | {2 * (k - 1) / k * mb:.1f} |")
    base = next(m for m in measured if m["ranks"] == 1)
    tokens_per_s = BATCH * SEED["block_size"] / base["compute_s"]
    print(f"\nhere, one process: {tokens_per_s:,.0f} tokens/s in forward and backward")
    t1, apply, grad_bytes = base["compute_s"], base["apply_s"], base["grad_bytes"]
    for title, per_node in (("global batch 32 (compute T1/K per node)", lambda k: t1 / k),
                            ("32 sequences per node (compute T1 per node)", lambda k: t1)):
        for label, width in (("fp32 gradients", 1.0), ("bf16 gradients", 0.5)):
            print(f"\nprojected efficiency, {title}, {label}: without overlap / with overlap")
            print("| nodes | " + " | ".join(f"{g} Gb/s" for g in GBITS) + " |")
            print("|---:|" + "---:|" * len(GBITS))
            for k in NODES:
                cells = []
                for g in GBITS:
                    comm = 2 * (k - 1) / k * grad_bytes * width * 8 / (g * 1e9)
                    c = per_node(k)
                    cells.append(f"{efficiency(c, apply, comm, False):.0%} / {efficiency(c, apply, comm, True):.0%}")
                print(f"| {k} | " + " | ".join(cells) + " |")
    goal(grad_bytes)


def goal(grad_bytes: int, nodes: int = 16, gbits: float = 25, target: float = 0.9) -> None:
    """What 90% at 16 nodes on 25 Gb/s asks of a node: the least forward and
    backward time per step, and so the most tokens/s a node may compute at
    2 sequences per node (global batch 32) and at 32 (global batch 512).
    Without overlap, c / (c + comm) >= 0.9 needs c >= 9 comm; with overlap
    (backward being 2/3 of c), c / (c / 3 + comm) >= 0.9 needs
    c >= comm / (1 / 0.9 - 1 / 3)."""
    print(f"\nthe goal, {target:.0%} at {nodes} nodes on {gbits:g} Gb/s (AdamW time left out):")
    print("| gradients | overlap | allreduce s | least compute s/step | most tokens/s per node at 2 seq | at 32 seq |")
    print("|---|---|---:|---:|---:|---:|")
    for label, width in (("fp32", 1.0), ("bf16", 0.5)):
        comm = 2 * (nodes - 1) / nodes * grad_bytes * width * 8 / (gbits * 1e9)
        for overlap in (False, True):
            least = comm / (1 / target - (1 - BACKWARD_SHARE)) if overlap else comm * target / (1 - target)
            tokens = [n * SEED["block_size"] / least for n in (2, 32)]
            print(f"| {label} | {'yes' if overlap else 'no'} | {comm:.3f} | {least:.3f} | {tokens[0]:,.0f} | "
                  f"{tokens[1]:,.0f} |")


if __name__ == "__main__":
    main()
