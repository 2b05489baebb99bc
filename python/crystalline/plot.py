"""A run's loss curves: its `metrics.jsonl` read back (`read_metrics`) and
drawn to a PNG with matplotlib (`plot_losses`, `crystalline plot`), written
through a temporary name so an existing plot is never left half-written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crystalline import checkpoint
from crystalline.atomic import write_atomic
from crystalline.errors import UserError
from crystalline.guard import writing


@dataclass
class Curves:
    steps: list[int] = field(default_factory=list)  # every step
    losses: list[float] = field(default_factory=list)  # its training loss
    val_steps: list[int] = field(default_factory=list)  # the steps with a validation loss
    val_losses: list[float] = field(default_factory=list)  # that loss


def read_metrics(run_dir: Path) -> Curves:
    """The loss curves in `run_dir`'s metrics.jsonl (see `checkpoint.metrics_records`)."""
    curves = Curves()
    for rec in checkpoint.metrics_records(run_dir):
        curves.steps.append(rec["step"])
        curves.losses.append(rec["loss"])
        if "val_loss" in rec:
            curves.val_steps.append(rec["step"])
            curves.val_losses.append(rec["val_loss"])
    return curves


def plot_losses(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the training and validation losses of `run_dir` to `out`
    (default RUN_DIR/loss.png); returns the file written."""
    curves = read_metrics(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'crystalline[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(curves.steps, curves.losses, label="train", linewidth=0.8)
    if curves.val_steps:
        ax.plot(curves.val_steps, curves.val_losses, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(f"Crystalline run {Path(run_dir).name}")
    ax.legend()
    ax.grid(alpha=0.3)
    target = Path(out or Path(run_dir) / "loss.png")
    # The format comes from the final name: the temporary one ends in .tmp.
    fmt = target.suffix[1:].lower() or "png"
    try:
        with writing(target, "--out"):
            write_atomic(target, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))
    except ValueError as err:  # an extension matplotlib has no format for
        raise UserError(f"--out {target}: {err}") from None
    finally:
        plt.close(fig)
    return target
