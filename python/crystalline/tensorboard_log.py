"""`train --tensorboard`: each step's metrics record also written as
TensorBoard scalars into RUN/tb/, with tensorboardX (the `tensorboard`
extra), so `tensorboard --logdir runs/` shows a run as it trains.

The tags: `loss/train`, `loss/val`, `lr`, `grad_norm`, `tokens_per_s` and
`sphere_busy_s/NN` for each sphere (00 is Node Zero), every one at the
step's number. A resumed run purges the events past its checkpoint, as it
cuts metrics.jsonl back, so TensorBoard shows each step once.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from crystalline.errors import UserError

TB_DIR = "tb"  # inside the run directory
# Seconds between flushes of the event file, so a live run shows in TensorBoard soon.
FLUSH_S = 5
# metrics.jsonl key -> scalar tag
SCALARS = {"loss": "loss/train", "val_loss": "loss/val", "lr": "lr", "grad_norm": "grad_norm",
           "tokens_per_s": "tokens_per_s"}
SPHERE_TAG = "sphere_busy_s/{:02d}"


def require() -> None:
    """UserError naming the extra unless tensorboardX is installed. Only
    looked up, not imported: tensorboardX imports PyTorch when that is
    installed too, which takes seconds."""
    if importlib.util.find_spec("tensorboardX") is None:
        raise UserError("--tensorboard needs tensorboardX: pip install 'crystalline-cllm[tensorboard]'")


class TensorBoardLog:
    """Writes metrics records as scalars into RUN_DIR/tb/ until closed."""

    def __init__(self, run_dir: Path, first_step: int) -> None:
        """A writer for a run whose next record is step `first_step`; the
        events of an earlier session at that step or later are purged."""
        require()
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(Path(run_dir) / TB_DIR), flush_secs=FLUSH_S,
                                    purge_step=first_step if first_step > 1 else None)

    def add(self, record: dict) -> None:
        step = record["step"]
        for key, tag in SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], step)
        for sphere, busy in enumerate(record["sphere_busy_s"]):
            self.writer.add_scalar(SPHERE_TAG.format(sphere), busy, step)

    def close(self) -> None:
        self.writer.close()


@contextmanager
def opened(run_dir: Path, first_step: int, enabled: bool) -> Iterator[TensorBoardLog | None]:
    """A TensorBoardLog for the block (closed after it) when `enabled`, else None."""
    if not enabled:
        yield None
        return
    board = TensorBoardLog(run_dir, first_step)
    try:
        yield board
    finally:
        board.close()
