"""Checkpoint directories: weights, optimizer moments, training state and the
tokenizer, written atomically and verified on load.

A run directory holds `metrics.jsonl` (a line per training step: a run
that goes on from a checkpoint first cuts it back to that step, and readers
skip a last line cut short by a crash), `.crystalline.lock` (one training
run at a time, see `crystalline.locks`) and `ckpt-00001234/` directories,
one per saved step:

- `model.safetensors`: the weights, under their GPT-2 tensor names
- `optimizer.safetensors`: AdamW's moments, `m.<name>` and `v.<name>`
- `state.json`: a `State`: config, step, epoch, data position, tokenizer
  hash, and the size and sha256 of every other file, so corruption is
  caught on load
- `tokenizer.json`: a copy of the tokenizer the model was trained with

This module owns that schema: `State` is what state.json holds, and
`restore_into` puts a checkpoint's tensors into a `_core.Model` or
`_core.Trainer`, refusing one whose names or shapes differ.

Each checkpoint is written into a temporary directory, fsynced, then renamed
into place, so a crash, `kill -9` or a full disk at any moment leaves every
earlier checkpoint intact; a leftover temporary directory is never read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from crystalline import _core, locks
from crystalline.atomic import disk_full_at, fsync_path, fsync_tree, is_temporary, write_atomic
from crystalline.config import ModelConfig, TrainConfig, canonical, check_types, check_unsigned
from crystalline.data.corpus import file_hash
from crystalline.errors import UserError
from crystalline.guard import read_json

METRICS = "metrics.jsonl"
PREFIX = "ckpt-"
TMP_PREFIX = ".tmp-ckpt-"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
TOKENIZER = "tokenizer.json"
FORMAT_VERSION = 1


@dataclass
class State:
    """What state.json records about a checkpoint."""

    config: TrainConfig  # the run's settings
    model: ModelConfig  # the network's shape
    step: int  # optimizer steps of the run so far: the checkpoint's number
    epoch: int  # the epoch the next step belongs to (0-based)
    epoch_step: int  # steps of that epoch already taken
    optimizer_step: int  # AdamW's step count t
    dealt: int  # sequences dealt to the symmetry groups this epoch
    tokenizer_hash: str  # sha256 of the tokenizer.json the model was trained with
    train_loss: float | None = None  # the last step's loss
    val_loss: float | None = None  # the last validation loss
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"bytes", "sha256"}, filled in by save
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, where: Path) -> State:
        """The state in `data` (parsed from the file `where`), older field
        names included. The one check of state.json: every field present
        (but the losses) and of its type, counts in the core's range, the
        model a shape the core can build; else a UserError naming `where`
        and the field."""
        name = f"checkpoint file {where}"
        if not isinstance(data, dict):
            raise UserError(f"{name} is not a Crystalline checkpoint state (not a JSON object)")
        missing = [f.name for f in fields(cls) if f.name not in data and (f.name == "files" or f.default is MISSING)]
        if missing:
            raise UserError(f"{name} is not a complete checkpoint state: it has no {missing[0]}")
        check_types(data, typing.get_type_hints(cls), name)
        check_types(canonical(data["config"]), typing.get_type_hints(TrainConfig), f"{name}: config")
        try:
            for count in ("step", "epoch", "epoch_step", "optimizer_step", "dealt"):
                check_unsigned(count, data[count])
        except ValueError as err:
            raise UserError(f"{name}: {err}") from None
        try:
            model = ModelConfig(**data["model"])
            model.validate()
        except (TypeError, ValueError) as err:
            raise UserError(f"{name} has no valid model config ({err})") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}
                   | {"config": TrainConfig.from_dict(data["config"]), "model": model})


@dataclass
class Checkpoint:
    path: Path
    state: State
    params: dict[str, np.ndarray]
    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]


def save(
    run_dir: Path,
    params: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray],
    v: Mapping[str, np.ndarray],
    state: State,
    tokenizer_path: Path,
    keep: int,
) -> Path:
    """Write checkpoint `state.step` into `run_dir` atomically; keep the newest
    `keep`. A full disk raises DiskFull naming the checkpoint, leaving the
    earlier ones intact and no temporary directory behind."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{PREFIX}{state.step:08d}"
    with disk_full_at(final):
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=run_dir))
        try:
            save_file({k: np.ascontiguousarray(a) for k, a in params.items()}, str(tmp / MODEL))
            moments = {f"m.{k}": np.ascontiguousarray(a) for k, a in m.items()}
            moments.update({f"v.{k}": np.ascontiguousarray(a) for k, a in v.items()})
            save_file(moments, str(tmp / OPTIMIZER))
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
            files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_hash(tmp / name)}
                     for name in (MODEL, OPTIMIZER, TOKENIZER)}
            full_state = replace(state, format_version=FORMAT_VERSION, files=files)
            (tmp / STATE).write_text(json.dumps(full_state.to_json(), indent=2))
            fsync_tree(tmp)
            if final.exists():  # re-saving a step (e.g. after resume): replace it
                discard(final)
            os.rename(tmp, final)
            fsync_path(run_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        discard(old)
    return final


def discard(ckpt: Path) -> None:
    """Delete a checkpoint so that no crash leaves half of it looking
    complete: rename it to a temporary name first, then remove it."""
    doomed = ckpt.with_name(f"{TMP_PREFIX}{ckpt.name}")
    os.rename(ckpt, doomed)
    fsync_path(ckpt.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories in `run_dir`, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_runs(root: Path) -> list[Path]:
    """Run directories (holding checkpoints) at or below `root`."""
    if list_checkpoints(root):
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_dir() and list_checkpoints(p) and not p.name.startswith(PREFIX))


@dataclass(frozen=True)
class Summary:
    """A checkpoint as `crystalline models` lists it."""

    path: Path
    state: State
    parameters: int  # the model's parameter count
    disk_bytes: int  # the size of its files
    saved: float  # when state.json was written, in seconds since the epoch


def summarize(ckpt: Path) -> Summary:
    state = read_state(ckpt)
    return Summary(path=ckpt, state=state, parameters=state.model.num_parameters(),
                   disk_bytes=sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()),
                   saved=(ckpt / STATE).stat().st_mtime)


def describe(path: Path) -> str:
    """What deleting `path` would delete, in words; UserError when it is
    neither a checkpoint nor a run directory."""
    if (path / STATE).is_file():
        return f"checkpoint {path}"
    if path.is_dir() and list_checkpoints(path):
        return f"run {path} ({len(list_checkpoints(path))} checkpoint(s) and its metrics)"
    raise UserError(f"{path} is neither a checkpoint nor a run directory; nothing deleted")


def delete(path: Path) -> None:
    """Delete a checkpoint (never leaving half of one) or a whole run
    directory, holding the run's lock: a run still training is refused
    (locks.InUse), not deleted from under it."""
    is_checkpoint = (path / STATE).is_file()
    with locks.locked(path.parent if is_checkpoint else path):
        if is_checkpoint:
            discard(path)
        else:
            shutil.rmtree(path)


def remove_temporaries(run_dir: Path) -> None:
    """Delete half-written checkpoints and files left by a crash (the run
    directory is locked: no other run is writing them)."""
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
            elif is_temporary(p.name):
                p.unlink(missing_ok=True)


def metrics_records(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, one per step. A last line cut
    short by a crash (no newline, not a record) is left out; any other line
    that is not a record is a UserError naming it."""
    path = Path(run_dir) / METRICS
    try:
        text = path.read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{run_dir} has no {METRICS}; is it a run directory?") from None
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror})") from None
    *lines, last = text.split("\n")  # `last` is "" when the file ends with a newline
    records = []
    for n, line in enumerate(lines, 1):
        record = metrics_record(line)
        if record is None:
            raise UserError(f"{path}:{n} is not a metrics record (a JSON object with step and loss): "
                            "the file is corrupt there; delete that line to go on")
        records.append(record)
    record = metrics_record(last)
    return records + ([record] if record is not None else [])


def metrics_record(line: str | bytes) -> dict | None:
    """A line of metrics.jsonl as its record (None: not a record)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "loss" not in record:
        return None
    return record


def cut_metrics(run_dir: Path, step: int) -> None:
    """Make RUN_DIR/metrics.jsonl hold one record for each of steps
    1..`step`, for a run that goes on from `step`: the records written after
    its checkpoint (written again by the resumed run) and a last line cut
    short by a crash go, and of a step recorded twice (by versions that did
    not cut) the later record stays. Rewritten atomically, and only when
    that changes it."""
    path = run_dir / METRICS
    if not path.exists():
        return
    latest = {r["step"]: r for r in metrics_records(run_dir)}
    kept = "".join(json.dumps(latest[s]) + "\n" for s in sorted(latest) if s <= step)
    if kept != path.read_text(errors="replace"):
        write_atomic(path, lambda tmp: tmp.write_text(kept))


def resolve(path: Path) -> Path:
    """A checkpoint directory, or a run directory meaning its latest checkpoint."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    if not path.exists():
        raise UserError(f"{path} does not exist")
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"{path} is neither a checkpoint nor a run directory with checkpoints ({PREFIX}*/{STATE})")
    return found[-1]


def read_state(ckpt: Path) -> State:
    state_path = ckpt / STATE
    if not state_path.exists():
        raise UserError(f"checkpoint {ckpt} has no {STATE}")
    return State.from_json(read_json(state_path, f"checkpoint file {state_path}"), state_path)


def load(path: Path, *, with_optimizer: bool = True) -> Checkpoint:
    """Load and verify a checkpoint (or a run directory's latest)."""
    ckpt = resolve(path)
    state = read_state(ckpt)
    names = (MODEL, OPTIMIZER, TOKENIZER) if with_optimizer else (MODEL, TOKENIZER)
    for name in names:
        f = ckpt / name
        want = state.files.get(name, {})
        if not f.is_file():
            raise UserError(f"checkpoint file {f} is missing")
        if f.stat().st_size != want.get("bytes") or file_hash(f) != want.get("sha256"):
            raise UserError(f"checkpoint file {f} is corrupt or truncated (size or sha256 differs from {STATE})")
    try:
        params = load_file(str(ckpt / MODEL))
        moments = load_file(str(ckpt / OPTIMIZER)) if with_optimizer else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"checkpoint {ckpt} cannot be read ({err})") from None
    m = {k[2:]: a for k, a in moments.items() if k.startswith("m.")}
    v = {k[2:]: a for k, a in moments.items() if k.startswith("v.")}
    return Checkpoint(path=ckpt, state=state, params=params, m=m, v=v)


def restore_into(ckpt: Checkpoint, target: _core.Model | _core.Trainer) -> None:
    """Copy the checkpoint's weights into `target`'s parameter views, and for
    a Trainer AdamW's moments and step count too; refuse a checkpoint whose
    tensor names or shapes differ from the target's."""
    stores = [(target.parameters(), ckpt.params)]
    if isinstance(target, _core.Trainer):
        m, v = target.optimizer_state()
        stores += [(m, ckpt.m), (v, ckpt.v)]
    for views, saved in stores:
        extra = sorted(saved.keys() - views.keys())
        if extra:
            raise UserError(f"checkpoint {ckpt.path} does not match the model (it has tensor {extra[0]}, "
                            "which the model does not)")
        for name, view in views.items():
            if name not in saved or saved[name].shape != view.shape:
                raise UserError(f"checkpoint {ckpt.path} does not match the model (tensor {name})")
            view[...] = saved[name]
    if isinstance(target, _core.Trainer):
        target.step_count = ckpt.state.optimizer_step
