"""Generation speed: Crystalline's KV-cache decoding against `transformers`
`generate` (with its cache) on the same weights, on 2 threads each; and,
where the CPU has avx512_bf16, Crystalline with bf16 weights against its
float32 (`load(..., precision="bf16")`).

For each config (small and seed, random weights) the model is saved as a
Crystalline run, exported with `crystalline.hf.export`, and loaded by both
libraries. Each side then greedily generates 256 new tokens after a
32-token prompt, at batch 1 and batch 8; tokens/s counts new tokens over
the whole call (prompt prefill included). The block size is 512 so that
32 + 256 tokens fit without sliding the window (the trained presets use 128).

The end-of-text row of the embedding is zeroed in both, so its logit is 0,
far below the largest of thousands of random logits: greedy decoding never
stops early and both sides produce all 256 tokens.

The timed runs of the libraries alternate, and each cell reports the median.

    python benches/generate.py [--configs small,seed] [--batches 1,8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from crystalline import _core, hf, load
from crystalline.config import ModelConfig
from crystalline.data.tokenizer import EOT
from crystalline.inference import Sampling, write_run

CONFIGS = {
    "small": ModelConfig(vocab_size=8192, n_embd=256, n_layer=4, n_head=8, block_size=512),
    "seed": ModelConfig(vocab_size=30000, n_embd=384, n_layer=6, n_head=12, block_size=512),
}
PROMPT_TOKENS = 32
NEW_TOKENS = 256
THREADS = 2


def synthetic_tokenizer(path: Path, vocab_size: int) -> int:
    """A byte-level BPE with exactly `vocab_size` tokens (no merges needed
    for timing); returns its end-of-text id."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {sym: i for i, sym in enumerate(sorted(alphabet))}
    vocab[EOT] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"tok{len(vocab)}"] = len(vocab)
    inner = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.save(str(path))
    return vocab[EOT]


def make_models(cfg: ModelConfig, work: Path, bf16: bool):
    """(our loaded model, our model with bf16 weights or None, transformers
    model) with the same random weights."""
    core = _core.Model(cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.block_size, seed=1)
    params = core.parameters()
    eot = synthetic_tokenizer(work / "tokenizer.json", cfg.vocab_size)
    params["wte.weight"][eot] = 0.0
    ckpt = write_run(work / "run", params, cfg, work / "tokenizer.json")
    ours = load(ckpt, threads=THREADS)
    ours16 = load(ckpt, threads=THREADS, precision="bf16") if bf16 else None
    import transformers

    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf.export(ckpt, work / "hf")).eval()
    return ours, ours16, theirs


def time_ours(model, prompts: np.ndarray) -> tuple[float, np.ndarray]:
    sampling = Sampling(max_tokens=NEW_TOKENS, temperature=0.0, top_k=0, seed=0)
    t0 = time.perf_counter()
    out = model.generate_ids(prompts.tolist(), sampling)
    dt = time.perf_counter() - t0
    assert all(len(o) == NEW_TOKENS for o in out), "stopped early"
    return dt, np.array(out)


def time_theirs(model, prompts: np.ndarray, eot: int) -> tuple[float, np.ndarray]:
    import torch

    ids = torch.tensor(prompts)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=eot)
        dt = time.perf_counter() - t0
    return dt, out[:, PROMPT_TOKENS:].numpy()


def agreement(a: np.ndarray, b: np.ndarray) -> int:
    """Leading new tokens the two greedy runs share (float rounding may split them later)."""
    same = np.cumprod(a[0] == b[0])
    return int(same.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="small,seed")
    parser.add_argument("--batches", default="1,8", help="Batch sizes to time.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per cell; the median counts.")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(THREADS)
    bf16 = _core.bf16_supported()
    rng = np.random.default_rng(0)
    rows = []
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            ours, ours16, theirs = make_models(cfg, Path(tmp), bf16)
            eot = ours.tokenizer.eot_id
            for batch in (int(b) for b in args.batches.split(",")):
                prompts = rng.integers(0, eot, size=(batch, PROMPT_TOKENS))
                runs = {"ours": lambda p: time_ours(ours, p), "theirs": lambda p: time_theirs(theirs, p, eot)}
                if ours16 is not None:
                    runs["bf16"] = lambda p: time_ours(ours16, p)
                for run in runs.values():  # warm up (thread pools, allocations)
                    run(prompts[:, :8])
                times = {key: [] for key in runs}
                for _ in range(args.repeats):  # alternate, so load falls on all alike
                    for key, run in runs.items():
                        times[key].append(run(prompts)[0])
                tps = {key: batch * NEW_TOKENS / float(np.median(t)) for key, t in times.items()}
                first = {key: run(prompts[:1])[1] for key, run in runs.items()}
                same = agreement(first["ours"], first["theirs"])
                same16 = agreement(first["ours"], first["bf16"]) if ours16 is not None else None
                rows.append((name, batch, tps, same, same16))
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{NEW_TOKENS} new tokens after a {PROMPT_TOKENS}-token prompt, greedy, {THREADS} threads each, "
          f"median of {args.repeats}; torch {torch.__version__}; load average {load_avg}\n")
    print("| config | batch | crystalline tok/s | transformers tok/s | ratio | same greedy tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, batch, tps, same, _ in rows:
        print(f"| {name} | {batch} | {tps['ours']:,.0f} | {tps['theirs']:,.0f} | {tps['ours'] / tps['theirs']:.2f}x "
              f"| {same}/{NEW_TOKENS} |")
    if not bf16:
        print("\nbf16: skipped, this CPU lacks avx512_bf16")
        return
    print("\n| config | batch | crystalline fp32 tok/s | crystalline bf16 tok/s | bf16 / fp32 | same greedy tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, batch, tps, _, same16 in rows:
        print(f"| {name} | {batch} | {tps['ours']:,.0f} | {tps['bf16']:,.0f} | {tps['bf16'] / tps['ours']:.2f}x "
              f"| {same16}/{NEW_TOKENS} |")


if __name__ == "__main__":
    main()
