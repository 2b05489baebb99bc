"""Checkpoint directories: weights, optimizer moments, training state and the
tokenizer, written atomically and verified on load.

A run directory holds `ckpt-00001234/` directories, one per saved step:

- `model.safetensors`: the weights, under their GPT-2 tensor names
- `optimizer.safetensors`: AdamW's moments, `m.<name>` and `v.<name>`
- `state.json`: config, step, epoch, data position, tokenizer hash, and the
  size and sha256 of every other file, so corruption is caught on load
- `tokenizer.json`: a copy of the tokenizer the model was trained with

Each checkpoint is written into a temporary directory, fsynced, then renamed
into place, so a crash or `kill -9` at any moment leaves every earlier
checkpoint intact; a leftover temporary directory is never read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from crystalline.atomic import fsync_path
from crystalline.data.corpus import file_hash
from crystalline.errors import UserError

PREFIX = "ckpt-"
TMP_PREFIX = ".tmp-ckpt-"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
TOKENIZER = "tokenizer.json"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    path: Path
    state: dict
    params: dict[str, np.ndarray]
    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]


def save(
    run_dir: Path,
    step: int,
    params: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray],
    v: Mapping[str, np.ndarray],
    state: dict,
    tokenizer_path: Path,
    keep: int,
) -> Path:
    """Write checkpoint `step` into `run_dir` atomically; keep the newest `keep`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=run_dir))
    try:
        save_file({k: np.ascontiguousarray(a) for k, a in params.items()}, str(tmp / MODEL))
        moments = {f"m.{k}": np.ascontiguousarray(a) for k, a in m.items()}
        moments.update({f"v.{k}": np.ascontiguousarray(a) for k, a in v.items()})
        save_file(moments, str(tmp / OPTIMIZER))
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        files = {}
        for name in (MODEL, OPTIMIZER, TOKENIZER):
            fsync_path(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": file_hash(tmp / name)}
        full_state = dict(state, format_version=FORMAT_VERSION, step=step, files=files)
        with open(tmp / STATE, "w") as f:
            json.dump(full_state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
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


def remove_temporaries(run_dir: Path) -> None:
    """Delete half-written checkpoints left by a crash."""
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


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


def read_state(ckpt: Path) -> dict:
    state_path = ckpt / STATE
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint {ckpt} has no {STATE}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint file {state_path} is corrupt or truncated ({err})") from None
    if not isinstance(state, dict) or "files" not in state or "config" not in state:
        raise UserError(f"checkpoint file {state_path} is not a Crystalline checkpoint state")
    return state


def load(path: Path, *, with_optimizer: bool = True) -> Checkpoint:
    """Load and verify a checkpoint (or a run directory's latest)."""
    ckpt = resolve(path)
    state = read_state(ckpt)
    names = (MODEL, OPTIMIZER, TOKENIZER) if with_optimizer else (MODEL, TOKENIZER)
    for name in names:
        f = ckpt / name
        want = state["files"].get(name, {})
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
