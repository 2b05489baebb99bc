"""`crystalline generate`, `chat`, `eval`, `models`, `export` and `import`:
using, inspecting and converting trained models from the command line."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

from crystalline import checkpoint, hf
from crystalline.config import U64_END, ModelConfig, capped_threads
from crystalline.errors import UserError
from crystalline.guard import read_stdin, read_text
from crystalline.inference import LoadedModel, Sampling, load

Opt = typer.Option
Arg = typer.Argument

CHECKPOINT_HELP = "A checkpoint directory, or a run directory (its latest checkpoint)."

MaxTokens = Annotated[int, Opt(help="New tokens per sample, at most (stops earlier at end-of-text).")]
Temperature = Annotated[float, Opt(help="Sampling temperature; 0 is greedy (always the likeliest token).")]
TopK = Annotated[int, Opt(help="Sample among the K likeliest tokens only (0: all).")]
TopP = Annotated[float, Opt(help="Nucleus sampling: the smallest set of likeliest tokens with this much "
                                 "probability, in (0, 1] (1: all).")]
Seed = Annotated[Optional[int], Opt(help="Seed for reproducible samples (default: a fresh one each run).")]
Threads = Annotated[Optional[int], Opt(help="Threads for the model (default: one per core).")]
Precision = Annotated[str, Opt(help="Matmul precision: fp32, bf16 (bf16 weights, f32 sums; needs avx512_bf16) "
                                    "or auto (bf16 where the CPU has it). CRYSTALLINE_FORCE_FP32=1 forces fp32.")]


def generate(
    checkpoint_path: Annotated[Path, Arg(metavar="CHECKPOINT", help=CHECKPOINT_HELP)],
    prompt: Annotated[Optional[str], Opt(help="Text to continue (else --prompt-file, else stdin).")] = None,
    prompt_file: Annotated[Optional[Path], Opt(help="Read the prompt from this file.")] = None,
    max_tokens: MaxTokens = 200,
    temperature: Temperature = 0.8,
    top_k: TopK = 40,
    top_p: TopP = 1.0,
    seed: Seed = None,
    num_samples: Annotated[int, Opt(help="Samples to draw from the prompt (generated together, as a batch).")] = 1,
    threads: Threads = None,
    precision: Precision = "fp32",
) -> None:
    """Continue a prompt with a trained model, streaming the text as it is written.

    When a sequence reaches the model's block size the window slides:
    generation goes on from its last block_size/2 tokens."""
    if prompt is not None and prompt_file is not None:
        raise UserError("give either --prompt or --prompt-file, not both")
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    Sampling(max_tokens, temperature, top_k, top_p, seed).validate()
    if prompt_file is not None:
        prompt = read_text(prompt_file, f"--prompt-file {prompt_file}")
    elif prompt is None:
        if sys.stdin.isatty():
            raise UserError("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe text to stdin")
        prompt = read_stdin("the prompt on standard input")
    model = _load(checkpoint_path, threads, precision)
    ids = model.encode_prompt(prompt)  # refuse an empty or too long prompt before printing anything
    model.check_generation_memory(num_samples, num_samples * len(ids))  # before a list of num_samples prompts
    args = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if num_samples == 1:
        _write(prompt)
        model.generate(prompt, stream=_write, **args)
        _write("\n")
        return
    for i, text in enumerate(model.generate_batch([prompt] * num_samples, **args)):
        _write(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\n{prompt}{text}\n")


def _load(checkpoint_path: Path, threads: int | None, precision: str) -> LoadedModel:
    """The model, on at most the core's MAX_THREADS threads (saying so when capped)."""
    if threads is not None:
        threads, warning = capped_threads(threads)
        if warning:
            typer.echo(f"warning: {warning}", err=True)
    return load(checkpoint_path, threads=threads, precision=precision)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat(
    checkpoint_path: Annotated[Path, Arg(metavar="CHECKPOINT", help=CHECKPOINT_HELP)],
    max_tokens: MaxTokens = 200,
    temperature: Temperature = 0.8,
    top_k: TopK = 40,
    top_p: TopP = 1.0,
    seed: Seed = None,
    threads: Threads = None,
    precision: Precision = "fp32",
) -> None:
    """Type prompts, read the model's continuations; Ctrl-D exits.

    Each line is a prompt on its own (the model has no memory of earlier
    turns). Ctrl-C stops a reply; Ctrl-D, or Ctrl-C at the prompt, exits.

    When a reply reaches the model's block size the window slides: it goes on
    from its last block_size/2 tokens."""
    Sampling(max_tokens, temperature, top_k, top_p, seed).validate()
    model = _load(checkpoint_path, threads, precision)
    err = Console(stderr=True)
    err.print(f"[bold]{model.path}[/]: {model.config.num_parameters():,} parameters, context "
              f"{model.block_size} tokens. Ctrl-D to quit.", soft_wrap=True)
    turn = 0
    while True:
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):
            _write("\n")
            return
        if not prompt.strip():
            continue
        try:
            model.encode_prompt(prompt)
        except UserError as bad:
            err.print(f"[red]error:[/] {bad}")
            continue
        turn_seed = None if seed is None else (seed + turn) % U64_END
        turn += 1
        _write(prompt)
        try:
            model.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=turn_seed, stream=_write)
        except KeyboardInterrupt:
            err.print("[dim](stopped)[/]")
        _write("\n")


def evaluate(
    checkpoint_path: Annotated[Path, Arg(metavar="CHECKPOINT", help=CHECKPOINT_HELP)],
    data: Annotated[list[Path], Arg(help="Held-out text files or directories (recursive).")],
    ext: Annotated[Optional[list[str]], Opt("--ext", help="Only files with this extension (repeatable).")] = None,
    threads: Threads = None,
    precision: Precision = "fp32",
    no_progress: Annotated[bool, Opt("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Loss, perplexity and bits per byte of a model on held-out text.

    Documents are joined with end-of-text, as in training, and scored in
    non-overlapping windows of the block size, so every token but the first
    is predicted once. Bits per byte = total loss in nats / ln 2 / UTF-8 bytes
    of the text; unlike the loss it compares models with different tokenizers."""
    model = _load(checkpoint_path, threads, precision)
    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=no_progress) as bar:
        task = bar.add_task("eval", total=None)
        result = model.evaluate(data, ext, progress=lambda done, total: bar.update(task, completed=done, total=total))
    typer.echo(f"files       {result.files}")
    typer.echo(f"tokens      {result.tokens:,} scored ({result.bytes:,} bytes of text)")
    typer.echo(f"loss        {result.loss:.4f} nats/token")
    typer.echo(f"perplexity  {result.perplexity:.2f}")
    typer.echo(f"bits/byte   {result.bits_per_byte:.4f}")


# -- models ------------------------------------------------------------------


class _ModelsGroup(TyperGroup):
    """`crystalline models [DIR]` lists; `models info|delete ...` are subcommands.
    A first argument that is not a subcommand is the directory to list."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


models_app = typer.Typer(cls=_ModelsGroup, help="List, inspect and delete trained models: `crystalline models "
                                                "[DIR]` lists the runs under DIR (default runs).",
                         no_args_is_help=False)


def _shape(cfg: ModelConfig) -> str:
    return f"V={cfg.vocab_size} C={cfg.n_embd} L={cfg.n_layer} H={cfg.n_head} T={cfg.block_size}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@models_app.command("list")
def list_models(
    directory: Annotated[Path, Arg(metavar="DIR", help="Where to look (recursively).")] = Path("runs"),
) -> None:
    """List runs and their checkpoints: config, parameters, step, last validation loss."""
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; pass the directory that holds your runs")
    runs = checkpoint.find_runs(directory)
    if not runs:
        typer.echo(f"no runs under {directory}")
        return
    table = Table("config", "parameters", "step", "train loss", "val loss", "saved")
    table.add_column("checkpoint", overflow="fold")
    for run in runs:
        for ckpt in checkpoint.list_checkpoints(run):
            try:
                s = checkpoint.summarize(ckpt)
            except UserError:
                table.add_row("[red]unreadable state.json[/]", "", "", "", "", "", str(ckpt))
                continue
            st = s.state
            table.add_row(_shape(st.model), f"{s.parameters:,}", str(st.step), _loss(st.train_loss),
                          _loss(st.val_loss), time.strftime("%Y-%m-%d %H:%M", time.localtime(s.saved)), str(ckpt))
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: no wrapping


@models_app.command("info")
def info(checkpoint_path: Annotated[Path, Arg(metavar="CHECKPOINT", help=CHECKPOINT_HELP)]) -> None:
    """Everything a checkpoint's state.json records, readably."""
    s = checkpoint.summarize(checkpoint.resolve(checkpoint_path))
    st = s.state
    lines = [
        ("checkpoint", str(s.path)),
        ("model", _shape(st.model)),
        ("parameters", f"{s.parameters:,}"),
        ("step", str(st.step)),
        ("train loss", _loss(st.train_loss)),
        ("val loss", _loss(st.val_loss)),
        ("tokenizer sha256", st.tokenizer_hash),
        ("size on disk", f"{s.disk_bytes / 2**20:,.1f} MiB"),
        ("other checkpoints", ", ".join(p.name for p in checkpoint.list_checkpoints(s.path.parent) if p != s.path)
         or "none"),
    ]
    for key, value in lines:
        typer.echo(f"{key:18} {value}")
    typer.echo("training config:")
    typer.echo(json.dumps(asdict(st.config), indent=2))


@models_app.command("delete")
def delete(
    path: Annotated[Path, Arg(metavar="CHECKPOINT", help="A checkpoint directory, or a run directory (all of it).")],
    yes: Annotated[bool, Opt("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete a checkpoint, or a whole run; asks first unless --yes."""
    what = checkpoint.describe(path)
    if not yes and not typer.confirm(f"Delete {what}?", default=False):
        raise UserError("nothing deleted", exit_code=1)
    checkpoint.delete(path)
    typer.echo(f"deleted {what}")


# -- export / import ---------------------------------------------------------


def export(
    checkpoint_path: Annotated[Path, Arg(metavar="CHECKPOINT", help=CHECKPOINT_HELP)],
    out: Annotated[Path, Opt(help="Directory to create.")],
    fmt: Annotated[str, Opt("--format", help="Only hf: a transformers GPT2LMHeadModel directory.")] = "hf",
) -> None:
    """Write a model in the Hugging Face format (config.json, model.safetensors, tokenizer).

    GPT2LMHeadModel.from_pretrained(OUT) and AutoTokenizer.from_pretrained(OUT)
    load the directory as it is."""
    if fmt != "hf":
        raise UserError(f"unknown --format {fmt!r}; the only format is hf")
    typer.echo(str(hf.export(checkpoint_path, out)))


def import_model(
    source: Annotated[Path, Arg(metavar="DIR", help="A Hugging Face GPT-2 directory (config.json + weights "
                                                     "+ tokenizer).")],
    out: Annotated[Path, Opt(help="Run directory to create.")],
    data: Annotated[Optional[list[str]], Opt("--data", help="What `crystalline train --resume OUT` fine-tunes "
                                                            "on (repeatable; default: the built-in corpus).")] = None,
) -> None:
    """Turn a Hugging Face GPT-2 model into a Crystalline run, to generate with or fine-tune.

    OUT gets one checkpoint with fresh optimizer state and the model's
    tokenizer; `crystalline train --resume OUT` fine-tunes it on --data."""
    typer.echo(str(hf.import_hf(source, out, data=[str(Path(d).resolve()) for d in data or []])))
