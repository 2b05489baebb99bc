"""The data commands of the command line: `prepare`, `tokenize` and `size`.

They are plain typer functions registered on the app in `crystalline.cli`;
bad input raises UserError, which the CLI turns into one message and exit 2.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from crystalline import estimate as est
from crystalline.config import canonical
from crystalline.data import corpus
from crystalline.data import prepare as prep
from crystalline.data import sizing
from crystalline.data.stats import SizeReport, TokenStats, size_run, token_stats
from crystalline.data.tokenizer import Tokenizer
from crystalline.errors import UserError
from crystalline.guard import utf8


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
        vocab_size = prep.default_vocab_size(data, out, ext)
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

    pieces = [utf8(text, "--text")] if text is not None else corpus.read_chunks(file, corpus.FileRead())
    if stats:
        _print_stats(token_stats(tok, pieces, top), json_out)
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


def _print_stats(st: TokenStats, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(st.to_json(), indent=1))
        return
    typer.echo(f"tokens          {st.tokens:,}")
    typer.echo(f"bytes           {st.bytes:,}")
    typer.echo(f"bytes/token     {st.bytes_per_token:.3f}" if st.tokens else "bytes/token     -")
    typer.echo("most frequent:")
    for i, s, c in st.top:
        typer.echo(f"  {i:>7}  {c:>10,}  {s!r}")
    typer.echo(f"symmetry groups (token_id % {len(st.groups)}):")
    for g, c in enumerate(st.groups):
        share = c / st.tokens if st.tokens else 0.0
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
    threads: Annotated[Optional[int], typer.Option(help="Sphere threads (for the memory and time estimates).")] = None,
    cores: Annotated[Optional[int], typer.Option(help="Cores (for the memory and time estimates; default: every CPU "
                                                      "this process may use).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the data (for the time estimate).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps (for the time estimate).")] = None,
    ext: Annotated[Optional[list[str]], typer.Option("--ext", help="Only files with this extension.")] = None,
    estimate: Annotated[bool, typer.Option(help="Time a few steps of the config to estimate the run's time.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar while preparing raw text.")] = True,
) -> None:
    """Parameter count, training memory, time, tokens available and a recommended model (exit 2 if untrainable).

    With no shape flags and no --config it sizes the recommended model; with
    them it sizes what `crystalline train` would build from the same flags.
    Raw text is prepared into the training cache first, as `train` would."""
    settings = canonical(dict(vocab_size=vocab_size, embed_dim=embed_dim, num_layers=num_layers, num_heads=num_heads,
                              batch_size=batch_size, seq_len=seq_len, threads=threads, cores=cores, epochs=epochs,
                              max_steps=max_steps))
    r = size_run(data, settings, config, ext, progress, timed=estimate,
                 notice=lambda line: typer.echo(f"note: {line}", err=True))
    cfg, model, rec, row = r.config, r.model, r.recommended, r.table_row
    typer.echo(f"data           {r.data_bytes / 1e6:.1f} MB, {r.train_tokens:,} train / {r.val_tokens:,} validation tokens")
    typer.echo(f"dataset        {r.dataset} ({r.dataset_bytes / 1e6:,.1f} MB on disk)")
    typer.echo(
        f"config         vocab {model.vocab_size:,}, embed {model.n_embd}, layers {model.n_layer}, "
        f"heads {model.n_head}, block {model.block_size}"
    )
    typer.echo(f"source         {r.source}")
    typer.echo(f"parameters     {r.parameters:,}")
    typer.echo(f"memory         {r.memory_bytes / 2**30:.2f} GiB to train at batch {cfg.batch_size} x seq {cfg.seq_len} "
               f"on {r.cores} cores")
    typer.echo(f"               = 4 bytes x (3 x {r.parameters:,} weights and moments + {r.lanes} lanes x "
               f"({r.parameters:,} gradients + activations of a [{r.micro_batch}, {cfg.seq_len}] micro-batch))"
               + (f" + {r.bf16_bytes:,} bytes of weights rounded to bf16" if r.bf16_bytes else "")
               + "; lanes: at most min(cores, worker spheres, batch), whatever the teams' sizes")
    typer.echo(f"tokens/param   {r.train_tokens / r.parameters:.2f} (advice: at least {sizing.MIN_TOKENS_PER_PARAM:g})")
    if r.estimate is not None:
        for label, line in zip(("time", ""), r.estimate.lines(cfg.batch_size * cfg.seq_len)):
            typer.echo(f"{label:14} {line}")
        for line in est.advice(r.estimate, model, cfg.seq_len, cfg.threads, cfg.batch_size, rec, cfg.cores):
            typer.echo(f"{'to shorten':14} {line}")
    typer.echo(
        f"recommended    vocab {rec.vocab_size:,}, embed {rec.n_embd}, layers {rec.n_layer}, heads {rec.n_head}, "
        f"block {rec.block_size}: {rec.num_parameters():,} parameters"
    )
    typer.echo(f"{'':14} {_why(r)}")
    typer.echo(f"train it with  {r.command}")
    typer.echo(
        f"design table   for {r.data_bytes / 1e6:.1f} MB: embed {row.config.n_embd}, layers {row.config.n_layer}, "
        f"stated {row.stated_params} parameters, true {row.config.num_parameters():,}"
    )
    for line in r.warnings:
        typer.echo(f"warning: {line}", err=True)
    typer.echo("ok: the data can train this config")


def _why(r: SizeReport) -> str:
    """Why the recommendation is what it is, and how it differs from the config."""
    rec, row = r.recommended, r.table_row.config
    rule = (f"the largest shape up to the design table's for {r.data_bytes / 1e6:.1f} MB with at least "
            f"{sizing.MIN_TOKENS_PER_PARAM:g} training token per parameter "
            f"({r.train_tokens / rec.num_parameters():.2f} here)")
    if (rec.n_embd, rec.n_layer, rec.n_head) != (row.n_embd, row.n_layer, row.n_head):
        rule += f"; the table's embed {row.n_embd}, layers {row.n_layer} would have " \
                f"{r.train_tokens / replace(row, vocab_size=rec.vocab_size).num_parameters():.2f}"
    if rec == r.model:
        return f"why: {rule}; it is the config above"
    return f"why: {rule}; differs from the config above ({r.parameters:,} parameters)"
