"""What the dashboard shows of the runs under a directory, read from their
files while `train` writes them: the runs themselves (`find_runs`), each
run's metrics.jsonl read incrementally (`MetricsTail`), the current epoch's
kissing-sphere figures (`epoch_layout`) and its checkpoints with their
validation losses and `crystalline validate` results (`checkpoints`).

Nothing here writes, locks or waits for a lock: a run being trained is read
as it is, and a checkpoint deleted between listing and reading is left out.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from crystalline import _core, checkpoint, validate
from crystalline.errors import UserError

ROOT_NAME = "."  # the name of RUNS_DIR itself when it is a run


def find_runs(root: Path) -> dict[str, Path]:
    """The run directories at or below `root` (those with a metrics.jsonl or
    checkpoints), by their path relative to `root`, sorted by name."""
    root = Path(root)
    found = {p.parent for p in root.rglob(checkpoint.METRICS) if p.is_file()} | set(checkpoint.find_runs(root))
    found = {p for p in found if not p.name.startswith((checkpoint.PREFIX, checkpoint.TMP_PREFIX))}
    return {(p.relative_to(root).as_posix() if p != root else ROOT_NAME): p for p in sorted(found)}


@dataclass
class MetricsTail:
    """The records of one metrics.jsonl, read incrementally: each `read`
    parses only the complete lines appended since the last one. A file
    replaced or cut back (a resumed run rewrites it to its checkpoint's
    step) is read again from the start, and `generation` counts up so that
    readers know to drop what they had."""

    path: Path
    records: list[dict] = field(default_factory=list)
    generation: int = 0
    bad_lines: int = 0  # complete lines that were no record
    _offset: int = 0
    _inode: int | None = None
    _partial: bytes = b""  # a last line without its newline yet
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self) -> tuple[int, list[dict]]:
        """(generation, every record so far)."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError:  # not written yet, or the run was deleted
                st = None
            if st is None or st.st_ino != self._inode or st.st_size < self._offset:
                if self._offset or self.records:
                    self.generation += 1
                self.records, self.bad_lines, self._offset, self._partial = [], 0, 0, b""
                self._inode = st.st_ino if st is not None else None
            if st is not None and st.st_size > self._offset:
                self._take(st.st_size)
            return self.generation, self.records

    def _take(self, size: int) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read(size - self._offset)
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            record = checkpoint.metrics_record(line)
            if record is None:
                self.bad_lines += 1
            else:
                self.records.append(record)


def epoch_layout(records: list[dict]) -> dict | None:
    """The kissing-sphere figures of the latest epoch's steps: each sphere's
    busy seconds and busy share (of the core's compute time, as the epoch
    report prints it; Node Zero first) and the sequences dealt to each of the
    12 symmetry groups. None before the first step."""
    if not records:
        return None
    epoch = records[-1].get("epoch")
    steps = [r for r in records if r.get("epoch") == epoch and isinstance(r.get("sphere_busy_s"), list)]
    if not steps:
        return None
    spheres = len(steps[-1]["sphere_busy_s"])
    steps = [r for r in steps if len(r["sphere_busy_s"]) == spheres]  # a resume may change --threads
    busy = [sum(r["sphere_busy_s"][i] for r in steps) for i in range(spheres)]
    timed = all("compute_s" in r for r in steps)
    compute = sum(r["compute_s"] for r in steps) if timed else 0.0
    dealt = all(len(r.get("group_sequences", ())) == _core.SYMMETRY_GROUPS for r in steps)
    return {
        "epoch": epoch,
        "steps": len(steps),
        "busy_s": busy,
        "busy_share": [b / compute for b in busy] if compute > 0 else None,
        "groups": [sum(r["group_sequences"][g] for r in steps) for g in range(_core.SYMMETRY_GROUPS)]
        if dealt else None,
    }


def checkpoints(run_dir: Path) -> list[dict]:
    """The run's checkpoints, oldest first: step, training and validation
    loss when saved, and the overall figures of `crystalline validate` when
    it has been run on the checkpoint."""
    out = []
    for ckpt in checkpoint.list_checkpoints(run_dir):
        try:
            state = checkpoint.read_state(ckpt)
        except (UserError, OSError):  # deleted by --keep while we read, or not (yet) readable
            continue
        out.append({"name": ckpt.name, "step": state.step, "train_loss": state.train_loss,
                    "val_loss": state.val_loss, "validate": validate.saved_summary(ckpt)})
    return out


def model_shape(run_dir: Path) -> dict | None:
    """The model and training settings the dashboard shows, from the latest
    readable checkpoint (None before the first)."""
    for ckpt in reversed(checkpoint.list_checkpoints(run_dir)):
        try:
            state = checkpoint.read_state(ckpt)
        except (UserError, OSError):
            continue
        return {"parameters": state.model.num_parameters(), "vocab_size": state.model.vocab_size,
                "n_embd": state.model.n_embd, "n_layer": state.model.n_layer, "n_head": state.model.n_head,
                "block_size": state.model.block_size, "batch_size": state.config.batch_size,
                "threads": state.config.threads}
    return None
