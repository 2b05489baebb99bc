"""Training throughput and peak memory: Crystalline against PyTorch.

Trains the same GPT-2 (tied embeddings, tanh GELU, pre-LayerNorm) with both
on the same random batches and the same AdamW settings, and prints tokens/s
(median over timed steps), the ratio, and each run's peak RSS, for the tiny,
small and seed configs, and for seq128 .. seq4096 (one model, 4,096 tokens per
step at sequence lengths 128, 1024, 2048 and 4096). Each measurement runs in a child process so peak RSS
is its own. PyTorch runs on `--torch-threads` threads (default 2);
Crystalline at each of `--threads` (default 1,2,3,12), and the table shows
--threads 12 against its best thread count.

Where the CPU has avx512_bf16 a second table adds Crystalline at 12 threads
with `--precision bf16` and PyTorch under torch.autocast("cpu",
dtype=torch.bfloat16), against both float32 runs of the first table
(`--no-bf16` skips it). `--rounds N` times Crystalline fp32 and bf16
alternately N times for it and reports the medians, with the median of the
rounds' ratios in the bf16 / fp32 column.

    python benches/train_vs_torch.py [--configs tiny,small,seed] [--steps 6]
    python benches/train_vs_torch.py --configs seq128,seq1024,seq2048,seq4096 --threads 12
    python benches/train_vs_torch.py --configs seed --threads 12 --steps 4 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "tiny": dict(V=4096, C=128, L=4, H=4, B=16, T=128),
    "small": dict(V=8192, C=256, L=4, H=8, B=16, T=128),
    "seed": dict(V=30000, C=384, L=6, H=12, B=32, T=128),
    # sequence lengths at equal tokens per step (4,096): the batch shrinks as T grows
    **{f"seq{t}": dict(V=8192, C=384, L=6, H=12, B=4096 // t, T=t) for t in (128, 1024, 2048, 4096)},
}
LR, WD, BETAS, EPS = 3e-4, 0.1, (0.9, 0.95), 1e-8


def batches(cfg: dict, n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(0, cfg["V"], size=(cfg["B"], cfg["T"] + 1)) for _ in range(n)]


def run_crystalline(cfg: dict, threads: int, steps: int, precision: str) -> list[float]:
    from crystalline import _core

    tr = _core.Trainer(cfg["V"], cfg["C"], cfg["L"], cfg["H"], cfg["T"], threads=threads, seed=0,
                       beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD, grad_clip=0.0)
    tr.set_precision(precision)
    times = []
    for batch in batches(cfg, steps + 2):
        t0 = time.perf_counter()
        tr.step(batch, LR)
        times.append(time.perf_counter() - t0)
    return times[2:]


def run_torch(cfg: dict, threads: int, steps: int, precision: str) -> list[float]:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    C, H = cfg["C"], cfg["H"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (z.view(b, t, H, C // H).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, C)
            x = x + self.attn_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(cfg["V"], C), nn.Embedding(cfg["T"], C)
            self.h = nn.ModuleList(Block() for _ in range(cfg["L"]))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for batch in batches(cfg, steps + 2):
        b = torch.from_numpy(batch)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(b[:, :-1], b[:, 1:])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[2:]


def worker(args) -> None:
    cfg = CONFIGS[args.config]
    run = run_torch if args.worker == "torch" else run_crystalline
    times = run(cfg, args.worker_threads, args.steps, args.precision)
    tokens = cfg["B"] * cfg["T"]
    print(json.dumps({"tokens_per_s": tokens / statistics.median(times), "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes. Unlike ru_maxrss
    it starts afresh at exec, so the parent's size does not leak in."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(kind: str, config: str, threads: int, steps: int, precision: str = "fp32") -> dict | None:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", kind, "--config", config, "--worker-threads", str(threads),
           "--steps", str(steps), "--precision", precision]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"# {kind} {config} threads={threads} failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small,seed")
    p.add_argument("--threads", default="1,2,3,12", help="Crystalline thread counts to try")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (after 2 warm-up steps)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 table")
    p.add_argument("--rounds", type=int, default=1,
                   help="bf16 table: measure Crystalline fp32 and bf16 alternately this many times and "
                        "report medians (1: bf16 once, against the first table's fp32)")
    p.add_argument("--worker", choices=["crystalline", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
        print("# torch is not importable: PyTorch columns are empty (pip install torch)", file=sys.stderr)
    thread_counts = [int(t) for t in args.threads.split(",")]
    print(f"| config | crystalline tok/s by --threads ({', '.join(map(str, thread_counts))}) | "
          f"threads 12 / best | torch tok/s ({args.torch_threads} thr) | crystalline@12 / torch | "
          "peak RSS crystalline@12 | peak RSS torch |")
    print("|---|---|---|---|---|---|---|")
    fp32 = {}
    for name in args.configs.split(","):
        ours = {t: measure("crystalline", name, t, args.steps) for t in thread_counts}
        theirs = measure("torch", name, args.torch_threads, args.steps) if have_torch else None
        tps = {t: r["tokens_per_s"] for t, r in ours.items() if r}
        best = max(tps.values())
        at12 = tps.get(12, float("nan"))
        row = [name, " / ".join(f"{tps[t]:,.0f}" for t in thread_counts if t in tps), f"{at12 / best:.2f}x"]
        if theirs:
            row += [f"{theirs['tokens_per_s']:,.0f}", f"{at12 / theirs['tokens_per_s']:.2f}x"]
        else:
            row += ["-", "-"]
        fp32[name] = (at12, theirs["tokens_per_s"] if theirs else float("nan"))
        rss12 = ours.get(12)
        row += [f"{rss12['peak_rss'] / 2**30:.2f} GiB" if rss12 else "-",
                f"{theirs['peak_rss'] / 2**30:.2f} GiB" if theirs else "-"]
        print("| " + " | ".join(row) + " |", flush=True)
    if not args.no_bf16:
        bf16_table(args, fp32, have_torch)


def bf16_table(args, fp32: dict, have_torch: bool) -> None:
    """Crystalline bf16 at 12 threads and PyTorch bf16 autocast, against the float32 runs."""
    from crystalline import _core

    if not _core.bf16_supported():
        print("\nbf16: skipped, this CPU lacks avx512_bf16")
        return
    print(f"\n| config | crystalline fp32@12 | crystalline bf16@12 | bf16 / fp32 | torch fp32 | bf16 / torch fp32 "
          f"| torch bf16 autocast ({args.torch_threads} thr) | bf16 / torch bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    def tokens_per_s(name: str, precision: str) -> float:
        r = measure("crystalline", name, 12, args.steps, precision)
        return r["tokens_per_s"] if r else float("nan")

    for name, (ours32, torch32) in fp32.items():
        # with rounds > 1 each round times fp32 and bf16 back to back, so that
        # a machine whose speed drifts (shared memory bandwidth) slows both alike
        rounds = [(ours32 if args.rounds == 1 else tokens_per_s(name, "fp32"), tokens_per_s(name, "bf16"))
                  for _ in range(args.rounds)]
        o32 = statistics.median(a for a, _ in rounds)
        o16 = statistics.median(b for _, b in rounds)
        ratio = statistics.median(b / a for a, b in rounds)
        torch16 = measure("torch", name, args.torch_threads, args.steps, "bf16") if have_torch else None
        t16 = torch16["tokens_per_s"] if torch16 else float("nan")
        print(f"| {name} | {o32:,.0f} | {o16:,.0f} | {ratio:.2f}x | {torch32:,.0f} | {o16 / torch32:.2f}x "
              f"| {t16:,.0f} | {o16 / t16:.2f}x |", flush=True)
        if args.rounds > 1:
            print(f"<!-- {name}, {args.rounds} rounds (fp32, bf16 tokens/s): "
                  + ", ".join(f"({a:,.0f}, {b:,.0f})" for a, b in rounds) + " -->", flush=True)


if __name__ == "__main__":
    main()
