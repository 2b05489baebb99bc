"""Generation speed: Crystalline's KV-cache decoding against `transformers`
`generate` (with its cache) on the same weights, on 2 threads each.

For each config (small and seed, random weights) the model is saved as a
Crystalline run, exported with `crystalline.hf.export`, and loaded by both
libraries. Each side then greedily generates 256 new tokens after a
32-token prompt, at batch 1 and batch 8; tokens/s counts new tokens over
the whole call (prompt prefill included). The block size is 512 so that
32 + 256 tokens fit without sliding the window (the trained presets use 128).

The end-of-text row of the embedding is zeroed in both, so its logit is 0,
far below the largest of thousands of random logits: greedy decoding never
stops early and both sides produce all 256 tokens.

    python benches/generate.py [--configs small,seed] [--repeats 2]
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


def make_models(cfg: ModelConfig, work: Path):
    """(our loaded model, transformers model) with the same random weights."""
    core = _core.Model(cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.block_size, seed=1)
    params = core.parameters()
    eot = synthetic_tokenizer(work / "tokenizer.json", cfg.vocab_size)
    params["wte.weight"][eot] = 0.0
    ckpt = write_run(work / "run", params, cfg, work / "tokenizer.json")
    ours = load(ckpt, threads=THREADS)
    import transformers

    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf.export(ckpt, work / "hf")).eval()
    return ours, theirs


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
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per cell; the best counts.")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    rows = []
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            ours, theirs = make_models(cfg, Path(tmp))
            eot = ours.tokenizer.eot_id
            for batch in (1, 8):
                prompts = rng.integers(0, eot, size=(batch, PROMPT_TOKENS))
                time_ours(ours, prompts[:, :8])  # warm up both (thread pools, allocations)
                time_theirs(theirs, prompts[:, :8], eot)
                t_ours = min(time_ours(ours, prompts)[0] for _ in range(args.repeats))
                t_theirs = min(time_theirs(theirs, prompts, eot)[0] for _ in range(args.repeats))
                same = agreement(time_ours(ours, prompts[:1])[1], time_theirs(theirs, prompts[:1], eot)[1])
                tokens = batch * NEW_TOKENS
                rows.append((name, batch, tokens / t_ours, tokens / t_theirs, same))
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{NEW_TOKENS} new tokens after a {PROMPT_TOKENS}-token prompt, greedy, {THREADS} threads each, "
          f"best of {args.repeats}; torch {torch.__version__}; load average {load_avg}\n")
    print("| config | batch | crystalline tok/s | transformers tok/s | ratio | same greedy tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, batch, ours_tps, theirs_tps, same in rows:
        print(f"| {name} | {batch} | {ours_tps:,.0f} | {theirs_tps:,.0f} | {ours_tps / theirs_tps:.2f}x "
              f"| {same}/{NEW_TOKENS} |")


if __name__ == "__main__":
    main()
