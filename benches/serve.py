"""Serving throughput and latency: `crystalline serve` under 1, 4 and 16
concurrent streaming clients.

A model of a preset's shape (default seed: 30000 x 384, 6 layers, block 128)
with random weights is saved as a run with a byte-level tokenizer of the same
vocabulary, and served by `crystalline serve --max-batch 16` in a subprocess.
Each client sends `--requests` requests one after another: a 32-token prompt
(32 ASCII characters), greedy, 96 new tokens (the end-of-text row of the
embedding is zeroed, as in benches/generate.py, so no answer stops early).

Per level: aggregate generated tokens/s (all clients' tokens over the
level's wall time), and p50/p95 of the time to first token (request sent to
first text) and of the time between tokens (gaps between a stream's chunks).
The goal: 16 clients reach at least 4x the tokens/s of 1 client.

    python benches/serve.py [--preset seed] [--requests 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from crystalline import _core
from crystalline.config import PRESETS, TrainConfig
from crystalline.inference import write_run

sys.path.insert(0, str(Path(__file__).parent))
from generate import synthetic_tokenizer  # noqa: E402

LEVELS = (1, 4, 16)
PROMPT = "def fib(n):\n    a, b = 0, 1\n    "  # 32 bytes: 32 tokens without merges
NEW_TOKENS = 96  # 32 + 96 = the presets' block size of 128


def make_run(preset: str, work: Path) -> Path:
    cfg = TrainConfig(**PRESETS[preset]).model_config()
    core = _core.Model(cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.block_size, seed=1)
    params = core.parameters()
    eot = synthetic_tokenizer(work / "tokenizer.json", cfg.vocab_size)
    params["wte.weight"][eot] = 0.0
    write_run(work / "run", params, cfg, work / "tokenizer.json")
    return work / "run"


def start_server(run: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "crystalline", "serve", str(run), "--port", "0", "--max-batch", str(max(LEVELS)),
           "--threads", str(threads)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (m := re.search(r" at (http://\S+)/v1$", log.read_text(), re.M)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc, m[1]


async def one_request(client: httpx.AsyncClient, url: str) -> tuple[int, float, list[float]]:
    """(tokens, time to first token, times between tokens) of one streamed request."""
    body = {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            if "usage" in chunk:
                tokens = chunk["usage"]["completion_tokens"]
    if tokens != NEW_TOKENS:
        raise SystemExit(f"a request got {tokens} tokens, not {NEW_TOKENS}")
    return tokens, stamps[0] - t0, list(np.diff(stamps))


async def level(url: str, clients: int, requests: int) -> dict:
    async def client_loop(client: httpx.AsyncClient) -> list:
        return [await one_request(client, url) for _ in range(requests)]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client_loop(client) for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = [r[1] for r in results]
    tbt = [gap for r in results for gap in r[2]]
    return {"clients": clients, "requests": len(results), "tokens": sum(r[0] for r in results), "wall": wall,
            "ttft": np.percentile(ttft, [50, 95]) * 1e3, "tbt": np.percentile(tbt, [50, 95]) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed", choices=sorted(PRESETS))
    parser.add_argument("--requests", type=int, default=2, help="Requests per client, one after another.")
    parser.add_argument("--threads", type=int, default=2, help="The server model's threads.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(args.preset, Path(tmp))
        proc, url = start_server(run, args.threads, Path(tmp) / "serve.log")
        try:
            asyncio.run(level(url, 1, 1))  # warm up: thread pools, allocations
            rows = [asyncio.run(level(url, c, args.requests)) for c in LEVELS]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    cfg = TrainConfig(**PRESETS[args.preset]).model_config()
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.preset} (V={cfg.vocab_size} C={cfg.n_embd} L={cfg.n_layer} T={cfg.block_size}), random weights; "
          f"{NEW_TOKENS} new tokens after a 32-token prompt, greedy, streamed; {args.requests} requests per client; "
          f"--max-batch {max(LEVELS)} --threads {args.threads}; {os.cpu_count()} cores, load average {load_avg}\n")
    print("| clients | requests | tokens/s | TTFT p50 ms | TTFT p95 ms | TBT p50 ms | TBT p95 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens'] / r['wall']:,.0f} | {r['ttft'][0]:,.0f} | "
              f"{r['ttft'][1]:,.0f} | {r['tbt'][0]:,.1f} | {r['tbt'][1]:,.1f} |")
    speedup = (rows[-1]["tokens"] / rows[-1]["wall"]) / (rows[0]["tokens"] / rows[0]["wall"])
    print(f"\n{LEVELS[-1]} clients / 1 client: {speedup:.1f}x aggregate tokens/s (goal: at least 4x)")
    print(f"command: python benches/serve.py --preset {args.preset} --requests {args.requests} "
          f"--threads {args.threads}")


if __name__ == "__main__":
    main()
