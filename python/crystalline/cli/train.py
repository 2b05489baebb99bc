"""`crystalline train` and `crystalline plot`: flags to a TrainConfig, and
the loss curves of a run to a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from crystalline import checkpoint
from crystalline.errors import UserError
from crystalline.plot import plot_losses
from crystalline.config import build_config, canonical
from crystalline.train import Trainer

Opt = typer.Option


def train(
    data: Annotated[Optional[list[Path]], typer.Argument(help="Files or directories of text or code (recursive). "
                                                         "None: the Python standard library's source.")] = None,
    vocab_size: Annotated[Optional[int], Opt(help="Tokenizer and model vocabulary.")] = None,
    embed_dim: Annotated[Optional[int], Opt(help="Residual width C.")] = None,
    num_layers: Annotated[Optional[int], Opt(help="Transformer blocks L.")] = None,
    num_heads: Annotated[Optional[int], Opt(help="Attention heads; must divide --embed-dim.")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Sequences per optimizer step.")] = None,
    seq_len: Annotated[Optional[int], Opt(help="Tokens per sequence (the model's context).")] = None,
    learning_rate: Annotated[Optional[float], Opt(help="Peak learning rate (warmup, then cosine decay).")] = None,
    epochs: Annotated[Optional[int], Opt(help="Passes over the training data.")] = None,
    threads: Annotated[Optional[int], Opt(help="Sphere threads: Node Zero + workers (default 12).")] = None,
    cores: Annotated[Optional[int], Opt(help="Cores the spheres divide into teams (default: every CPU this "
                                             "process may use).")] = None,
    precision: Annotated[Optional[str], Opt(help="Matmul precision: fp32 (default), bf16 (bf16 operands, float32 "
                                                 "weights, optimizer, norms and sums; needs avx512_bf16) or auto "
                                                 "(bf16 where the CPU has it). CRYSTALLINE_FORCE_FP32=1 forces fp32.")] = None,
    checkpoint_dir: Annotated[Optional[str], Opt(help="Run directory (default runs/<date-time>).")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed for initialisation and data order.")] = None,
    warmup_steps: Annotated[Optional[int], Opt(help="Linear warmup steps.")] = None,
    weight_decay: Annotated[Optional[float], Opt(help="AdamW decoupled weight decay.")] = None,
    grad_clip: Annotated[Optional[float], Opt(help="Clip the gradient's global norm (0: off).")] = None,
    eval_interval: Annotated[Optional[int], Opt(help="Steps between validation losses.")] = None,
    val_fraction: Annotated[Optional[float], Opt(help="Fraction of documents held out.")] = None,
    max_steps: Annotated[Optional[int], Opt(help="Stop after this many steps.")] = None,
    save_interval: Annotated[Optional[int], Opt(help="Steps between checkpoints.")] = None,
    keep: Annotated[Optional[int], Opt(help="Checkpoints to keep.")] = None,
    ext: Annotated[Optional[list[str]], Opt("--ext", help="Only files with this extension (repeatable).")] = None,
    tokenizer: Annotated[Optional[str], Opt(help="Use this tokenizer.json.")] = None,
    sample_tokens: Annotated[Optional[int], Opt(help="Tokens to sample after training (0: none).")] = None,
    preset: Annotated[Optional[str], Opt(help="quick (default), tiny, small, seed, or auto (from the data size).")] = None,
    config: Annotated[Optional[Path], Opt("--config", help="TOML file of settings; flags override it.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in --checkpoint-dir (or the run directory "
                                                "given as DATA) from its latest checkpoint.")] = False,
    watch: Annotated[Optional[Path], Opt(help="Keep training on this directory: at each epoch boundary (or every "
                                               "--watch-interval steps) pick up new and changed files, prepare only "
                                               "those, and go on from the current weights. Runs until Ctrl-C unless "
                                               "--epochs/--max-steps; the learning rate stays at its peak after warmup.")] = None,
    watch_interval: Annotated[Optional[int], Opt(help="Steps between checks of --watch (default: each epoch).")] = None,
    verbose: Annotated[bool, Opt("--verbose", help="A line per sphere per step.")] = False,
    tensorboard: Annotated[Optional[bool], Opt("--tensorboard/--no-tensorboard",
                                               help="Also write the metrics as TensorBoard scalars into RUN/tb/ "
                                                    "(pip install 'crystalline-cllm[tensorboard]').")] = None,
    no_progress: Annotated[bool, Opt("--no-progress", help="No progress bar.")] = False,
    estimate: Annotated[Optional[bool], Opt("--estimate/--no-estimate",
                                            help="Time a few steps before step 1 and say how long the run will "
                                                 "take (default); --no-estimate skips that probe, and the progress "
                                                 "bar's times start from the first steps.")] = None,
) -> None:
    """Train a GPT-2 model on text or code, on every core, with checkpoints."""
    data = list(data or [])
    if resume and len(data) == 1 and checkpoint.list_checkpoints(data[0]) and checkpoint_dir is None:
        checkpoint_dir, data = str(data[0]), []
    if resume and not checkpoint_dir:
        raise UserError("--resume needs the run: pass --checkpoint-dir RUN_DIR or `crystalline train --resume RUN_DIR`")
    overrides = canonical(dict(  # the flags' names to the config's
        data=[str(p) for p in data] or None, vocab_size=vocab_size, embed_dim=embed_dim, num_layers=num_layers,
        num_heads=num_heads, batch_size=batch_size, seq_len=seq_len, learning_rate=learning_rate, epochs=epochs,
        threads=threads, cores=cores, precision=precision, checkpoint_dir=checkpoint_dir, seed=seed,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, eval_interval=eval_interval, val_fraction=val_fraction,
        max_steps=max_steps, save_interval=save_interval, keep=keep, extensions=ext, tokenizer=tokenizer,
        sample_tokens=sample_tokens, preset=preset, verbose=verbose or None, progress=False if no_progress else None,
        estimate=estimate, watch=str(watch) if watch else None, watch_interval=watch_interval, tensorboard=tensorboard,
    ))
    console = Console(stderr=True, soft_wrap=True)
    if resume:
        if config is not None:
            raise UserError("--config cannot be used with --resume: a resumed run keeps its saved settings")
        trainer = Trainer.resuming(checkpoint_dir, overrides, console)
    else:
        trainer = Trainer(build_config(overrides, config, preset="quick"), console)
    run = trainer.run()
    if run.interrupted:
        raise typer.Exit(130)
    if run.losses:
        console.print(f"[Node Zero] done: {run.steps} steps, final loss {run.final_loss:.4f}; "
                      f"checkpoint {run.last_checkpoint}")
    if run.sample is not None:
        console.print("[Node Zero] sample from the trained model:")
        typer.echo(run.sample)


def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (with metrics.jsonl).")],
    out: Annotated[Optional[Path], Opt(help="PNG to write (default RUN_DIR/loss.png).")] = None,
) -> None:
    """Draw the training and validation loss curves of a run to a PNG."""
    typer.echo(str(plot_losses(run_dir, out)))
