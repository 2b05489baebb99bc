"""`train --tensorboard`: the scalars in RUN/tb/, read back with TensorBoard's
own event reader, are metrics.jsonl's figures at their steps; a resumed run
purges the events past its checkpoint; without tensorboardX the flag is one
message naming the extra, before any work."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from crystalline import checkpoint  # noqa: E402
from crystalline.tensorboard_log import SCALARS, SPHERE_TAG, TB_DIR  # noqa: E402
from commandline import cli  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = ["--vocab-size", "300", "--embed-dim", "32", "--num-layers", "1", "--num-heads", "2", "--batch-size", "8",
        "--seq-len", "32", "--no-progress", "--sample-tokens", "0", "--ext", ".py", "--threads", "3",
        "--eval-interval", "4", "--save-interval", "5", "--tensorboard"]
# Runs the command line as if tensorboardX were not installed.
WITHOUT_TENSORBOARDX = ("import runpy, sys; sys.modules['tensorboardX'] = None;"
                        "runpy.run_module('crystalline', run_name='__main__')")


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in RUN/tb/, as TensorBoard reads it: tag -> [(step, value)]."""
    acc = event_accumulator.EventAccumulator(str(run / TB_DIR), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What metrics.jsonl says each series holds."""
    records = checkpoint.metrics_records(run)
    out = {tag: [(r["step"], r[key]) for r in records if key in r] for key, tag in SCALARS.items()}
    for sphere in range(len(records[0]["sphere_busy_s"])):
        out[SPHERE_TAG.format(sphere)] = [(r["step"], r["sphere_busy_s"][sphere]) for r in records]
    return out


def assert_same(found: dict, wanted: dict) -> None:
    assert sorted(found) == sorted(wanted)
    for tag, series in wanted.items():
        assert [s for s, _ in found[tag]] == [s for s, _ in series], tag
        assert [v for _, v in found[tag]] == pytest.approx([v for _, v in series], rel=1e-6), tag  # float32


def test_the_scalars_are_the_metrics_and_a_resume_purges_what_follows_its_checkpoint(tmp_path, env):
    run = tmp_path / "run"
    r = cli(["train", str(STDLIB / "json"), *TINY, "--max-steps", "12", "--checkpoint-dir", str(run)], env)
    assert r.returncode == 0, r.stderr
    found = scalars(run)
    assert set(found) == {"loss/train", "loss/val", "lr", "grad_norm", "tokens_per_s", "sphere_busy_s/00",
                          "sphere_busy_s/01", "sphere_busy_s/02"}  # --threads 3: Node Zero and two workers
    assert [s for s, _ in found["loss/train"]] == list(range(1, 13))
    assert [s for s, _ in found["loss/val"]] == [4, 8, 12]
    assert_same(found, expected(run))
    # as if the run had crashed after step 12 but before saving it: the resume goes on from step 10
    shutil.rmtree(checkpoint.list_checkpoints(run)[-1])
    r = cli(["train", "--resume", str(run), "--max-steps", "14", "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "at step 10" in r.stderr
    found = scalars(run)
    assert [s for s, _ in found["loss/train"]] == list(range(1, 15))  # steps 11 and 12 once, not twice
    assert_same(found, expected(run))


def without_tensorboardx(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TENSORBOARDX, *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_without_tensorboardx_the_flag_names_the_extra(tmp_path, env):
    run = tmp_path / "run"
    r = without_tensorboardx(["train", str(STDLIB / "json"), *TINY, "--checkpoint-dir", str(run)], env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: --tensorboard needs tensorboardX: pip install 'crystalline-cllm[tensorboard]'"
    assert not run.exists()  # refused before any work
    # a run saved with the flag resumes without it when asked
    r = cli(["train", str(STDLIB / "json"), *TINY, "--max-steps", "5", "--checkpoint-dir", str(run)], env)
    assert r.returncode == 0, r.stderr
    r = without_tensorboardx(["train", "--resume", str(run), "--max-steps", "6", "--no-progress"], env)
    assert r.returncode == 2 and "pip install 'crystalline-cllm[tensorboard]'" in r.stderr, r.stderr
    r = without_tensorboardx(["train", "--resume", str(run), "--max-steps", "6", "--no-progress",
                              "--no-tensorboard"], env)
    assert r.returncode == 0, r.stderr
    assert len(checkpoint.metrics_records(run)) == 6 and len(scalars(run)["loss/train"]) == 5
