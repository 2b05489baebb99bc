"""Statistics for the data commands: how a tokenizer cuts a text and how its
tokens fall into the symmetry groups (`crystalline tokenize --stats`), and
what training a model on a dataset takes (`crystalline size`).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from crystalline import _core, estimate
from crystalline.config import ModelConfig, TrainConfig, build_config, flag
from crystalline.data import corpus, sizing
from crystalline.data import prepare as prep
from crystalline.data.tokenizer import Tokenizer
from crystalline.errors import UserError
from crystalline.estimate import Estimate
from crystalline.guard import available_memory, core_refusals, gib
from crystalline.precision import resolve as resolve_precision

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
    source: str  # where config's shape came from: flags, --config, the quick preset, or auto
    parameters: int  # the model's parameter count
    memory_bytes: int  # what training allocates at config's batch size, sequence length, threads and cores
    bf16_bytes: int  # of memory_bytes, the weights rounded to bf16 when the matmuls run in bf16 (else 0)
    cores: int  # the cores sized for: --cores, else every core this process may use
    lanes: int  # lanes of working memory a step's plan uses on them
    micro_batch: int  # sequences of the largest micro-batch (a symmetry group's share of a batch)
    recommended: ModelConfig  # the largest shape the data supports (sizing.recommend), the tokenizer's vocab
    table_row: sizing.Row  # the design table's row for data_bytes
    command: str  # the `crystalline train` command that trains the recommended model
    dataset: Path  # the prepared dataset sized (the one given, or in the training cache)
    dataset_bytes: int  # what that dataset takes on disk
    estimate: Estimate | None  # how long the run takes here (None: not asked for)
    warnings: list[str]  # what may go wrong: too few tokens per parameter, too little memory, ...

    @property
    def model(self) -> ModelConfig:
        return self.config.model_config()


def size_run(data: list[Path], settings: dict, config_file: Path | None = None,
             extensions: list[str] | None = None, progress: bool = True, timed: bool = False,
             notice: Callable[[str], None] | None = None) -> SizeReport:
    """Size a training run on `data` (a prepared dataset directory, or text
    files and directories, prepared through the training cache, as `train`
    would). `settings` are TrainConfig fields (None: not given) over the
    quick preset and the `config_file`; without shape settings or a file
    the recommended shape is sized, as the `command` printed for it would
    train it. The model's vocabulary is the tokenizer's. With `timed`, a
    probe estimates the run's time (`crystalline.estimate`). `notice` hears,
    before raw text is prepared, where the dataset goes and about how big it
    will be. Raises UserError when the data cannot fill one step."""
    given = {k: v for k, v in settings.items() if v is not None}
    auto = config_file is None and not given.keys() & SHAPE_SETTINGS
    asked = build_config(given, config_file, preset="quick")
    ds, data_bytes = _dataset(data, given.get("vocab_size") if auto else asked.vocab_size, extensions, progress,
                              notice)
    if given.get("vocab_size", ds.vocab_size) < ds.vocab_size:
        raise UserError(f"vocab size {given['vocab_size']} is smaller than the tokenizer's {ds.vocab_size}; "
                        f"use --vocab-size {ds.vocab_size}")
    rec = replace(sizing.recommend(ds.train_count, data_bytes), vocab_size=ds.vocab_size)
    shape = dict(vocab_size=ds.vocab_size, n_embd=rec.n_embd, n_layer=rec.n_layer, n_head=rec.n_head,
                 seq_len=rec.block_size)
    rec_config = build_config({**given, **shape}, config_file, preset="quick")
    if auto:
        cfg, source = rec_config, "auto: the recommended shape for this data (the command below trains it)"
    else:
        cfg, source = build_config({**given, "vocab_size": ds.vocab_size}, config_file, preset="quick"), \
            _source(given, config_file, asked.preset)
    cfg.validate()
    model = cfg.model_config()
    with core_refusals():  # a size whose memory overflows a 64-bit count
        fp32 = model.training_memory_bytes(cfg.batch_size, cfg.seq_len, cfg.threads, cfg.cores)
        memory = model.training_memory_bytes(cfg.batch_size, cfg.seq_len, cfg.threads, cfg.cores,
                                             resolve_precision(cfg.precision))
    cores = cfg.cores or _core.available_cores()
    plan = _core.plan_teams(threads=cfg.threads, cores=cores, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
    warnings = sizing.check_data(model, ds.train_count, cfg.batch_size, cfg.seq_len)
    ram = _physical_memory()
    if ram and memory > ram:
        warnings.append(f"training needs {memory / 2**30:.1f} GiB but this machine has {ram / 2**30:.1f} GiB")
    est, free = None, available_memory()
    if timed and free is not None and memory > free:
        warnings.append(f"no time estimate: training needs {gib(memory)} but only {gib(free)} of memory is available")
    elif timed:
        with core_refusals():
            est = estimate.for_run(cfg, ds.train_count, ds.val_count)
    return SizeReport(data_bytes=data_bytes, train_tokens=ds.train_count, val_tokens=ds.val_count, config=cfg,
                      source=source, parameters=model.num_parameters(), memory_bytes=memory,
                      bf16_bytes=memory - fp32, cores=cores, lanes=len(plan["cores"]),
                      micro_batch=-(-cfg.batch_size // _core.SYMMETRY_GROUPS),
                      recommended=replace(rec, block_size=rec_config.seq_len),
                      table_row=sizing.table_row(data_bytes), command=_train_command(data, ds, rec_config, given,
                                                                                  config_file, extensions),
                      dataset=ds.root, dataset_bytes=_disk_bytes(ds.root), estimate=est, warnings=warnings)


def _source(given: dict, config_file: Path | None, preset: str | None) -> str:
    """Where a config's settings came from, strongest first."""
    parts = []
    flags = [f"{flag(k)} {v}" for k, v in given.items() if k != "vocab_size"]
    if flags:
        parts.append("flags " + " ".join(flags))
    if config_file is not None:
        parts.append(f"--config {config_file}")
    if preset:
        parts.append(f"the {preset} preset")
    return " over ".join(parts) + "; vocab from the tokenizer"


def _train_command(data: list[Path], ds: prep.Dataset, cfg: TrainConfig, given: dict, config_file: Path | None,
                   extensions: list[str] | None) -> str:
    """The `crystalline train` command that trains `cfg` on the text of `data`."""
    words = ["crystalline", "train"]
    if len(data) == 1 and Path(data[0]).resolve() == ds.root.resolve():  # a prepared dataset: its text
        try:  # one of the training cache: the inputs it records (which find it again), its tokenizer if one was given
            source = json.loads((ds.root / prep.SOURCE).read_text())
            words += source["paths"]
            extensions = extensions or source["extensions"]
            given_tokenizer = source["tokenizer"] is not None
        except (OSError, ValueError, KeyError, TypeError):  # made by `prepare --out`: the folder of its files
            words.append(os.path.commonpath([e["path"] for e in prep.read_manifest(ds.root)["files"]]))
            given_tokenizer = True
        if given_tokenizer:
            words += ["--tokenizer", str(ds.tokenizer_path)]
    else:
        words += [str(p) for p in data]
    for ext in extensions or []:
        words += ["--ext", ext]
    if config_file is not None:
        words += ["--config", str(config_file)]
    shown = ["vocab_size", "n_embd", "n_layer", "n_head", "seq_len", *(k for k in given if k not in SHAPE_SETTINGS)]
    for name in dict.fromkeys(shown):
        words += [flag(name), str(getattr(cfg, name))]
    return shlex.join(words)


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _dataset(data: list[Path], vocab_size: int | None, extensions: list[str] | None, progress: bool,
             notice: Callable[[str], None] | None) -> tuple[prep.Dataset, int]:
    """(dataset, source bytes): a prepared directory as it is, raw text via
    the training cache (prepared with `vocab_size`, else the design table's)."""
    if len(data) == 1 and (Path(data[0]) / prep.MANIFEST).is_file():
        ds = prep.load_dataset(data[0])
        return ds, ds.source_bytes()
    data_bytes = corpus.total_bytes(data, extensions)
    vocab = vocab_size or sizing.vocab_for(data_bytes)
    if notice is not None:
        where, _ = prep.cached_dataset(data, vocab, extensions=extensions)
        if prep.read_manifest(where) is None:
            notice(f"preparing a dataset of {data_bytes / 1e6:,.1f} MB of text in {where}: about "
                   f"{prep.expected_bytes(data_bytes, vocab) / 1e6:,.0f} MB on disk (`crystalline cache` lists "
                   "and clears them)")
        else:
            notice(f"using the dataset in {where} ({_disk_bytes(where) / 1e6:,.1f} MB), updating it if the text changed")
    return prep.prepare_for_training(data, vocab, extensions=extensions, progress=progress), data_bytes


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
