"""The data commands of the command line: `prepare`, `tokenize` and `size`.

They are plain typer functions registered on the app in `crystalline.cli`;
bad input raises UserError, which the CLI turns into one message and exit 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from crystalline.config import build_config
from crystalline.data import corpus
from crystalline.data import prepare as prep
from crystalline.data import sizing
from crystalline.data.tokenizer import Tokenizer
from crystalline.errors import UserError

GROUPS = 12  # the symmetry groups of `tokenize --stats`: token_id % 12


def prepare(
    data: Annotated[list[Path], typer.Argument(help="Text files or directories (walked recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to create or update.")],
    vocab_size: Annotated[
        Optional[int],
        typer.Option(help="Tokenizer vocabulary size. Default: the one already in --out, else by data size."),
    ] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Use this tokenizer.json instead of training one.")] = None,
    ext: Annotated[
        Optional[list[str]], typer.Option("--ext", help="Only files with this extension (repeatable), e.g. --ext py.")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction of documents held out for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation split.")] = 0,
    retrain_tokenizer: Annotated[
        bool, typer.Option(help="Train a new tokenizer even if --out has one for this vocab size.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Tokenize text into a memory-mappable dataset; re-runs encode only new or changed files."""
    start = time.perf_counter()
    if vocab_size is None and tokenizer is None:
        vocab_size = _default_vocab_size(data, out, ext)
    ds = prep.prepare(
        data,
        out,
        vocab_size,
        tokenizer=tokenizer,
        extensions=ext,
        val_fraction=val_fraction,
        seed=seed,
        progress=progress,
        retrain_tokenizer=retrain_tokenizer,
    )
    r = ds.report
    tok_state = "trained" if r.tokenizer_trained else "reused"
    typer.echo(f"dataset      {ds.root}")
    typer.echo(f"files        {r.files:,} ({r.bytes / 1e6:.1f} MB); skipped: {r.skipped.skipped_summary()}")
    typer.echo(f"encoded      {r.files_encoded:,} file(s), reused {r.files_reused:,}")
    typer.echo(f"tokenizer    {tok_state}, vocab {ds.vocab_size:,} ({ds.tokenizer_path})")
    typer.echo(f"tokens       {ds.train_count:,} train, {ds.val_count:,} validation ({ds.dtype})")
    typer.echo(f"time         {time.perf_counter() - start:.2f} s")


def _default_vocab_size(data: list[Path], out: Path, ext: list[str] | None) -> int:
    """The vocab size of the tokenizer already in `out`, else the design
    table's vocab for the amount of text."""
    manifest = prep.read_manifest(Path(out).expanduser())
    if manifest is not None:
        return manifest["requested_vocab_size"]
    files, _ = corpus.walk(data, ext, exclude=out)
    return sizing.table_row(sum(f.size for f in files)).config.vocab_size


def tokenize(
    file: Annotated[Optional[Path], typer.Argument(help="File to encode (or, with --decode, ids to decode).")] = None,
    text: Annotated[Optional[str], typer.Option(help="Encode (or decode) this text instead of a file.")] = None,
    tokenizer: Annotated[
        Optional[Path], typer.Option(help="A tokenizer.json, or a dataset directory that holds one.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    decode: Annotated[bool, typer.Option(help="Read token ids (JSON list or whitespace/commas) and print text.")] = False,
    stats: Annotated[bool, typer.Option(help="Print token statistics instead of the ids.")] = False,
    top: Annotated[int, typer.Option(help="How many frequent tokens --stats lists.")] = 10,
) -> None:
    """Encode text to token ids, decode ids to text, or show token statistics."""
    if tokenizer is None:
        raise UserError("tokenize needs --tokenizer: a tokenizer.json or a dataset directory made by `prepare`")
    tok_path = Path(tokenizer) / prep.TOKENIZER if Path(tokenizer).is_dir() else Path(tokenizer)
    tok = Tokenizer.load(tok_path)
    if (file is None) == (text is None):
        raise UserError("give exactly one input: a FILE argument or --text")
    if file is not None and not file.is_file():
        raise UserError(f"input file {file} does not exist")

    if decode:
        raw = text if text is not None else file.read_text(encoding="utf-8", errors="replace")
        sys.stdout.write(tok.decode(_parse_ids(raw)))
        return

    pieces = [text] if text is not None else corpus.read_chunks(file, corpus.FileRead())
    if stats:
        _print_stats(tok, pieces, json_out, top)
        return
    first = True
    if json_out:
        sys.stdout.write("[")
    for ids in _encode_stream(tok, pieces):
        if ids:
            sep = "," if json_out else " "
            sys.stdout.write(("" if first else sep) + sep.join(map(str, ids)))
            first = False
    sys.stdout.write("]\n" if json_out else "\n")


def _encode_stream(tok: Tokenizer, pieces) -> Iterator[list[int]]:
    for piece in pieces:
        yield tok.encode(piece)


def _parse_ids(raw: str) -> list[int]:
    raw = raw.strip()
    try:
        ids = json.loads(raw) if raw.startswith("[") else [int(t) for t in raw.replace(",", " ").split()]
    except ValueError:
        raise UserError("--decode expects token ids: a JSON list or integers separated by spaces or commas") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError("--decode expects a JSON list of integers")
    return ids


def _print_stats(tok: Tokenizer, pieces, json_out: bool, top: int) -> None:
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    nbytes = 0
    for piece in pieces:
        nbytes += len(piece.encode("utf-8"))
        counts += np.bincount(np.asarray(tok.encode(piece), dtype=np.int64), minlength=tok.vocab_size)
    total = int(counts.sum())
    order = np.argsort(-counts, kind="stable")[:top]
    frequent = [(int(i), tok.decode([int(i)]), int(counts[i])) for i in order if counts[i]]
    groups = [int(counts[g::GROUPS].sum()) for g in range(GROUPS)]
    if json_out:
        out = {
            "tokens": total,
            "bytes": nbytes,
            "bytes_per_token": nbytes / total if total else None,
            "top": [{"id": i, "text": s, "count": c} for i, s, c in frequent],
            "groups": groups,
        }
        typer.echo(json.dumps(out, indent=1))
        return
    typer.echo(f"tokens          {total:,}")
    typer.echo(f"bytes           {nbytes:,}")
    typer.echo(f"bytes/token     {nbytes / total:.3f}" if total else "bytes/token     -")
    typer.echo("most frequent:")
    for i, s, c in frequent:
        typer.echo(f"  {i:>7}  {c:>10,}  {s!r}")
    typer.echo(f"symmetry groups (token_id % {GROUPS}):")
    for g, c in enumerate(groups):
        share = c / total if total else 0.0
        typer.echo(f"  {g:>2}  {c:>10,}  {share:6.1%}  {'#' * round(share * 120)}")  # 10 marks = uniform


def size(
    data: Annotated[list[Path], typer.Argument(help="A dataset directory, or text files and directories.")],
    config: Annotated[
        Optional[Path], typer.Option(help="The TOML settings file `crystalline train --config` takes.")
    ] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Vocabulary size (default: the tokenizer's).")] = None,
    embed_dim: Annotated[Optional[int], typer.Option(help="Residual width C.")] = None,
    num_layers: Annotated[Optional[int], typer.Option(help="Transformer blocks.")] = None,
    num_heads: Annotated[Optional[int], typer.Option(help="Attention heads.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per step.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per sequence (the block size).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Sphere threads (for the memory estimate).")] = None,
    ext: Annotated[Optional[list[str]], typer.Option("--ext", help="Only files with this extension.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar while preparing raw text.")] = True,
) -> None:
    """Parameter count, training memory, tokens available and a recommended model (exit 2 if untrainable).

    With no shape flags and no --config it sizes the recommended model; with
    them it sizes what `crystalline train` would build from the same flags."""
    ds, data_bytes = _dataset_for_size(data, vocab_size, ext, progress)
    num_tokens = ds.train_count
    rec = sizing.recommend(num_tokens, data_bytes)
    flags = dict(vocab_size=vocab_size, n_embd=embed_dim, n_layer=num_layers, n_head=num_heads,
                 batch_size=batch_size, seq_len=seq_len, threads=threads)
    flags = {k: v for k, v in flags.items() if v is not None}
    if config is None and not flags.keys() & {"n_embd", "n_layer", "n_head", "seq_len"}:
        flags = dict(vocab_size=ds.vocab_size, n_embd=rec.n_embd, n_layer=rec.n_layer, n_head=rec.n_head,
                     seq_len=rec.block_size, **{k: v for k, v in flags.items() if k in ("batch_size", "threads")})
    flags.setdefault("vocab_size", ds.vocab_size)
    train_cfg = build_config(flags, config, preset="quick")
    train_cfg.validate()
    cfg = train_cfg.model_config()
    if cfg.vocab_size < ds.vocab_size:
        raise UserError(
            f"vocab size {cfg.vocab_size} is smaller than the tokenizer's {ds.vocab_size}; "
            f"use --vocab-size {ds.vocab_size}"
        )
    batch, seq = train_cfg.batch_size, train_cfg.seq_len

    params = cfg.num_parameters()
    memory = cfg.training_memory_bytes(batch, seq, train_cfg.threads)
    typer.echo(f"data           {data_bytes / 1e6:.1f} MB, {ds.train_count:,} train / {ds.val_count:,} validation tokens")
    typer.echo(
        f"config         vocab {cfg.vocab_size:,}, embed {cfg.n_embd}, layers {cfg.n_layer}, "
        f"heads {cfg.n_head}, block {cfg.block_size}"
    )
    typer.echo(f"parameters     {params:,}")
    typer.echo(f"memory         {memory / 2**30:.2f} GiB to train at batch {batch} x seq {seq}")
    typer.echo(f"tokens/param   {num_tokens / params:.2f} (advice: at least {sizing.MIN_TOKENS_PER_PARAM:g})")
    row = sizing.table_row(data_bytes)
    typer.echo(
        f"recommended    vocab {rec.vocab_size:,}, embed {rec.n_embd}, layers {rec.n_layer}, heads {rec.n_head}, "
        f"block {rec.block_size}: {rec.num_parameters():,} parameters"
    )
    typer.echo(
        f"design table   for {data_bytes / 1e6:.1f} MB: embed {row.config.n_embd}, layers {row.config.n_layer}, "
        f"stated {row.stated_params} parameters, true {row.config.num_parameters():,}"
    )
    warnings = sizing.check_data(cfg, num_tokens, batch, seq)
    ram = _physical_memory()
    if ram and memory > ram:
        warnings.append(f"training needs {memory / 2**30:.1f} GiB but this machine has {ram / 2**30:.1f} GiB")
    for line in warnings:
        typer.echo(f"warning: {line}", err=True)
    typer.echo("ok: the data can train this config")


def _dataset_for_size(data: list[Path], vocab_size: int | None, ext: list[str] | None, progress: bool):
    """(dataset, source bytes): a prepared directory as it is, raw text via the training cache."""
    if len(data) == 1 and (Path(data[0]) / prep.MANIFEST).is_file():
        ds = prep.load_dataset(data[0])
        return ds, sum(e["size"] for e in prep.read_manifest(ds.root)["files"])
    files, _ = corpus.walk(data, ext)
    data_bytes = sum(f.size for f in files)
    vocab = vocab_size or sizing.table_row(data_bytes).config.vocab_size
    return prep.prepare_for_training(data, vocab, extensions=ext, progress=progress), data_bytes


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
