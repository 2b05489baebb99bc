"""Model-size advice: which GPT-2 shape fits how much data, and whether a
dataset can train a given config at all.

The starting point is the table from the original design notes, by dataset
size. Its parameter estimates are all too high; with block_size 256 and tied
input/output embeddings (`ModelConfig.num_parameters()`), the true counts are:

| Dataset size | Vocab | Embed | Layers | Heads | Table says | True count  |
|--------------|-------|-------|--------|-------|------------|-------------|
| < 10MB       | 10K   | 256   | 4      | 8     | ~10M       | 5,785,088   |
| 10-50MB      | 20K   | 384   | 6      | 12    | ~30M       | 18,425,856  |
| 50-200MB     | 30K   | 512   | 8      | 16    | ~80M       | 40,711,168  |
| 200MB-1GB    | 50K   | 768   | 12     | 24    | ~200M      | 123,652,608 |
| > 1GB        | 100K  | 1024  | 16     | 32    | ~500M      | 304,203,776 |

Tokens per parameter: compute-optimal training sees about 20 tokens per
parameter (Hoffmann et al. 2022, "Chinchilla"). With a fixed corpus the
tokens must come from repeating it; Muennighoff et al. 2023 ("Scaling
Data-Constrained Language Models") find ~4 epochs almost as good as fresh
data and returns from repetition fading by ~16 epochs. 20 tokens per
parameter over roughly 16-20 useful epochs needs about 1 unique token per
parameter, so `MIN_TOKENS_PER_PARAM = 1`: below it a model mostly memorises.
`recommend` takes the table's row for the data size and steps down to smaller
shapes (two below the table for small corpora) until that ratio holds;
`check_data` warns below it.
"""

from __future__ import annotations

from dataclasses import dataclass

from crystalline.config import ModelConfig
from crystalline.errors import UserError

MB = 1_000_000
MIN_TOKENS_PER_PARAM = 1.0
BLOCK_SIZE = 256


@dataclass(frozen=True)
class Row:
    max_bytes: float  # the row applies to data smaller than this
    config: ModelConfig
    stated_params: str  # the design table's estimate ("" for rows added below it)


def _cfg(vocab: int, embd: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, n_embd=embd, n_layer=layers, n_head=heads, block_size=BLOCK_SIZE)


# Smallest first. The first two rows are ours, for corpora too small for the table.
LADDER = [
    Row(0, _cfg(1024, 64, 2, 4), ""),
    Row(0, _cfg(4096, 128, 4, 4), ""),
    Row(10 * MB, _cfg(10_000, 256, 4, 8), "~10M"),
    Row(50 * MB, _cfg(20_000, 384, 6, 12), "~30M"),
    Row(200 * MB, _cfg(30_000, 512, 8, 16), "~80M"),
    Row(1000 * MB, _cfg(50_000, 768, 12, 24), "~200M"),
    Row(float("inf"), _cfg(100_000, 1024, 16, 32), "~500M"),
]
TABLE = [row for row in LADDER if row.stated_params]


def table_row(data_bytes: int) -> Row:
    """The design table's row for a dataset of `data_bytes` bytes."""
    return next(row for row in TABLE if data_bytes < row.max_bytes)


def vocab_for(data_bytes: int) -> int:
    """The design table's vocabulary for `data_bytes` bytes of text."""
    return table_row(data_bytes).config.vocab_size


def recommend(num_tokens: int, data_bytes: int) -> ModelConfig:
    """The largest shape, up to the table's row for `data_bytes`, with at
    least MIN_TOKENS_PER_PARAM tokens per parameter (else the smallest)."""
    top = LADDER.index(table_row(data_bytes))
    for row in reversed(LADDER[: top + 1]):
        if num_tokens >= MIN_TOKENS_PER_PARAM * row.config.num_parameters():
            return row.config
    return LADDER[0].config


def check_data(cfg: ModelConfig, num_tokens: int, batch_size: int, seq_len: int) -> list[str]:
    """Warnings about training `cfg` on `num_tokens` training tokens; raises
    UserError when not even one step of batch_size x seq_len fits."""
    need = batch_size * seq_len + 1  # inputs plus the next-token target of the last one
    if num_tokens < need:
        raise UserError(
            f"Dataset too small: need {need:,} tokens, have {num_tokens:,} "
            f"(one step of --batch-size {batch_size} x --seq-len {seq_len} plus one); "
            "add text or lower --batch-size / --seq-len"
        )
    warnings = []
    params = cfg.num_parameters()
    ratio = num_tokens / params
    if ratio < MIN_TOKENS_PER_PARAM:
        warnings.append(
            f"only {ratio:.2f} tokens per parameter ({num_tokens:,} tokens, {params:,} parameters); "
            f"below {MIN_TOKENS_PER_PARAM:g} the model will mostly memorise the data; "
            "use a smaller model (see `crystalline size`) or more text"
        )
    steps = num_tokens // (batch_size * seq_len)
    if steps < 10:
        warnings.append(f"one pass over the data is only {steps} step(s) of {batch_size} x {seq_len} tokens")
    return warnings
