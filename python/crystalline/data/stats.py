"""Statistics for the data commands: how a tokenizer cuts a text and how its
tokens fall into the symmetry groups (`crystalline tokenize --stats`), and
what training a model on a dataset takes (`crystalline size`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crystalline import _core
from crystalline.config import ModelConfig, TrainConfig, build_config
from crystalline.data import corpus, sizing
from crystalline.data import prepare as prep
from crystalline.data.tokenizer import Tokenizer
from crystalline.errors import UserError
from crystalline.guard import core_refusals

# The settings that choose the model's shape: given none, `size` sizes the recommended model.
SHAPE_SETTINGS = {"n_embd", "n_layer", "n_head", "seq_len"}


@dataclass(frozen=True)
class TokenStats:
    tokens: int  # tokens in the text
    bytes: int  # UTF-8 bytes of the text
    top: list[tuple[int, str, int]]  # (id, text, count) of the most frequent tokens, most frequent first
    groups: list[int]  # tokens in each symmetry group, token_id % SYMMETRY_GROUPS

    @property
    def bytes_per_token(self) -> float | None:
        return self.bytes / self.tokens if self.tokens else None

    def to_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "bytes_per_token": self.bytes_per_token,
            "top": [{"id": i, "text": s, "count": c} for i, s, c in self.top],
            "groups": self.groups,
        }


def token_stats(tok: Tokenizer, pieces: Iterable[str], top: int = 10) -> TokenStats:
    """Count the tokens of a text given as `pieces` (e.g. a file's chunks)."""
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    nbytes = 0
    for piece in pieces:
        nbytes += len(piece.encode("utf-8"))
        counts += np.bincount(np.asarray(tok.encode(piece), dtype=np.int64), minlength=tok.vocab_size)
    order = np.argsort(-counts, kind="stable")[:top]
    frequent = [(int(i), tok.decode([int(i)]), int(counts[i])) for i in order if counts[i]]
    groups = [int(counts[g :: _core.SYMMETRY_GROUPS].sum()) for g in range(_core.SYMMETRY_GROUPS)]
    return TokenStats(tokens=int(counts.sum()), bytes=nbytes, top=frequent, groups=groups)


@dataclass(frozen=True)
class SizeReport:
    data_bytes: int  # bytes of source text
    train_tokens: int  # tokens of the training split
    val_tokens: int  # tokens of the validation split
    config: TrainConfig  # the run sized: the flags and --config file, else the recommended shape
    parameters: int  # the model's parameter count
    memory_bytes: int  # what training allocates at config's batch size, sequence length, threads and cores
    cores: int  # the cores sized for: --cores, else every core this process may use
    lanes: int  # lanes of working memory a step's plan uses on them
    micro_batch: int  # sequences of the largest micro-batch (a symmetry group's share of a batch)
    recommended: ModelConfig  # the largest shape the data supports (sizing.recommend)
    table_row: sizing.Row  # the design table's row for data_bytes
    warnings: list[str]  # what may go wrong: too few tokens per parameter, too little memory, ...

    @property
    def model(self) -> ModelConfig:
        return self.config.model_config()


def size_run(data: list[Path], settings: dict, config_file: Path | None = None,
             extensions: list[str] | None = None, progress: bool = True) -> SizeReport:
    """Size a training run on `data` (a prepared dataset directory, or text
    files and directories, prepared through the training cache). `settings`
    are TrainConfig fields (None: not given) over the quick preset and the
    `config_file`; without shape settings the recommended model is sized.
    Raises UserError when the data cannot fill one step."""
    ds, data_bytes = _dataset(data, settings.get("vocab_size"), extensions, progress)
    rec = sizing.recommend(ds.train_count, data_bytes)
    given = {k: v for k, v in settings.items() if v is not None}
    if config_file is None and not given.keys() & SHAPE_SETTINGS:
        given = dict(vocab_size=ds.vocab_size, n_embd=rec.n_embd, n_layer=rec.n_layer, n_head=rec.n_head,
                     seq_len=rec.block_size, **{k: v for k, v in given.items() if k in ("batch_size", "threads", "cores")})
    given.setdefault("vocab_size", ds.vocab_size)
    cfg = build_config(given, config_file, preset="quick")
    cfg.validate()
    model = cfg.model_config()
    if model.vocab_size < ds.vocab_size:
        raise UserError(
            f"vocab size {model.vocab_size} is smaller than the tokenizer's {ds.vocab_size}; "
            f"use --vocab-size {ds.vocab_size}"
        )
    with core_refusals():  # a size whose memory overflows a 64-bit count
        memory = model.training_memory_bytes(cfg.batch_size, cfg.seq_len, cfg.threads, cfg.cores)
    cores = cfg.cores or _core.available_cores()
    plan = _core.plan_teams(threads=cfg.threads, cores=cores, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
    warnings = sizing.check_data(model, ds.train_count, cfg.batch_size, cfg.seq_len)
    ram = _physical_memory()
    if ram and memory > ram:
        warnings.append(f"training needs {memory / 2**30:.1f} GiB but this machine has {ram / 2**30:.1f} GiB")
    return SizeReport(data_bytes=data_bytes, train_tokens=ds.train_count, val_tokens=ds.val_count, config=cfg,
                      parameters=model.num_parameters(), memory_bytes=memory, cores=cores, lanes=len(plan["cores"]),
                      micro_batch=-(-cfg.batch_size // _core.SYMMETRY_GROUPS), recommended=rec,
                      table_row=sizing.table_row(data_bytes), warnings=warnings)


def _dataset(data: list[Path], vocab_size: int | None, extensions: list[str] | None,
             progress: bool) -> tuple[prep.Dataset, int]:
    """(dataset, source bytes): a prepared directory as it is, raw text via the training cache."""
    if len(data) == 1 and (Path(data[0]) / prep.MANIFEST).is_file():
        ds = prep.load_dataset(data[0])
        return ds, sum(e["size"] for e in prep.read_manifest(ds.root)["files"])
    data_bytes = corpus.total_bytes(data, extensions)
    vocab = vocab_size or sizing.vocab_for(data_bytes)
    return prep.prepare_for_training(data, vocab, extensions=extensions, progress=progress), data_bytes


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
