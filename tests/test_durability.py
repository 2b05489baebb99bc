"""Files and concurrency: what `prepare` may touch and delete, one run per
directory (the locks), metrics.jsonl after a crash, durable exports, a full
disk while saving a checkpoint, a plot or an export, a corrupt token file,
and kill -9 at random moments ending bit-identical. Tiny models on a few KB
of text."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
from rich.console import Console

from crystalline import atomic, checkpoint, locks
from crystalline.config import TrainConfig
from crystalline.crawl import CrawlConfig
from crystalline.crawl import run as crawl
from crystalline.data import prepare as prep
from crystalline.data.prepare import load_dataset, prepare, prepare_for_training
from crystalline.errors import UserError
from crystalline.plot import read_metrics
from crystalline.train import Trainer
from commandline import cli, cli_limited

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VOCAB = 300
TINY = ["--vocab-size", str(VOCAB), "--embed-dim", "16", "--num-layers", "1", "--num-heads", "2", "--seq-len", "16",
        "--batch-size", "4", "--threads", "2", "--no-progress", "--sample-tokens", "0"]
RESUME = ["--no-progress", "--sample-tokens", "0"]
# What a metrics record holds besides timings, which differ from run to run.
MEASURES = ("step", "epoch", "loss", "lr", "grad_norm", "val_loss")


def text_corpus(root: Path, files: int = 4) -> Path:
    """A few KB of real text: the start of some standard-library modules."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "fnmatch.py")[:files]:
        (root / f"{Path(name).stem}.txt").write_text((STDLIB / name).read_text()[:2500])
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too) by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def own_env(tmp_path, env):
    """CLI environment with a prepare cache of this test's own."""
    return dict(env, XDG_CACHE_HOME=str(tmp_path / "xdg"))


def cache_root(own_env: dict) -> Path:
    return Path(own_env["XDG_CACHE_HOME"]) / "crystalline" / "datasets"


def steps_recorded(run: Path) -> int:
    return len(checkpoint.metrics_records(run)) if (run / checkpoint.METRICS).exists() else 0


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2, and the last line of stderr is the error, holding `message`."""
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr
    assert "Traceback" not in result.stderr


# --- 1. what prepare may touch --------------------------------------------------


def test_prepare_refuses_a_hugging_face_model_directory_and_touches_nothing(tmp_path, env):
    src = text_corpus(tmp_path / "src")
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    (model / "pytorch_model.bin").write_bytes(os.urandom(4096))
    before = snapshot(model)
    r = cli(["prepare", str(src), "--out", str(model), "--vocab-size", str(VOCAB), "--no-progress"], env)
    assert_refused(r, f"--out {model} is a non-empty directory that is not a crystalline dataset")
    assert snapshot(model) == before  # the same files (not even a lock file), the same bytes


def test_only_a_marked_manifest_or_a_legacy_one_makes_a_directory_a_dataset(tmp_path):
    src = text_corpus(tmp_path / "src")
    out = tmp_path / "ds"
    prepare([src], out, VOCAB, progress=False)
    manifest = json.loads((out / prep.MANIFEST).read_text())
    assert manifest["format"] == "crystalline-dataset/1"

    # a dataset written before the marker: "format": 1 and exactly the keys of then
    (out / prep.MANIFEST).write_text(json.dumps(dict(manifest, format=1)))
    assert prepare([src], out, VOCAB, progress=False).report.files_encoded == 0
    assert json.loads((out / prep.MANIFEST).read_text())["format"] == "crystalline-dataset/1"

    # another tool's manifest.json, even one much like ours, is not ours
    (out / prep.MANIFEST).write_text(json.dumps(dict(manifest, format=1, made_by="another tool")))
    before = snapshot(out)
    with pytest.raises(UserError, match=f"--out {out} is a non-empty directory that is not a crystalline dataset"):
        prepare([src], out, VOCAB, progress=False)
    assert snapshot(out) == before

    # the same rule for the caches `train` prepares into
    cache = tmp_path / "cache"
    root = prepare_for_training([src], VOCAB, cache_dir=cache, progress=False).root
    (root / prep.MANIFEST).unlink()
    (root / "pytorch_model.bin").write_bytes(b"weights")
    before = snapshot(root)
    with pytest.raises(UserError, match="not a crystalline dataset"):
        prepare_for_training([src], VOCAB, cache_dir=cache, progress=False)
    assert snapshot(root) == before


def test_a_first_prepare_cut_short_can_be_run_again(tmp_path, monkeypatch):
    src = text_corpus(tmp_path / "src")
    out = tmp_path / "ds"
    monkeypatch.setattr(prep, "_write_token_files", Mock(side_effect=KeyboardInterrupt))  # a crash
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, VOCAB, progress=False)
    monkeypatch.undo()
    assert (out / prep.TOKENIZER).is_file()  # written before the crash: the directory is not empty
    with pytest.raises(UserError, match="not a complete dataset"):
        load_dataset(out)
    assert prepare([src], out, VOCAB, progress=False).train_count > 0


def test_prepare_deletes_only_files_it_made(tmp_path):
    src = text_corpus(tmp_path / "src")
    out = tmp_path / "ds"
    first = prepare([src], out, VOCAB, progress=False)
    shard_dir = next((out / prep.SHARDS).iterdir())
    old_tokenizer = out / prep.SHARDS / "0123456789abcdef"  # shards of a tokenizer since replaced
    (old_tokenizer / "ab").mkdir(parents=True)
    (old_tokenizer / "ab" / ("ab" + "0" * 62 + ".bin")).write_bytes(b"\0\0")
    (old_tokenizer / "ab" / "notes.txt").write_text("mine")
    theirs = {out / "notes.bin": b"mine", out / ".draft.tmp": b"mine", out / prep.SHARDS / "readme.txt": b"mine",
              shard_dir / "mine.bin": b"mine", old_tokenizer / "ab" / "notes.txt": b"mine"}
    for path, data in theirs.items():
        path.write_bytes(data)

    (src / "shlex.txt").write_text("a changed file\n" * 50)
    second = prepare([src], out, VOCAB, progress=False)
    assert second.train_file != first.train_file
    assert not (out / first.train_file).exists() and (out / second.train_file).is_file()
    assert not (old_tokenizer / "ab" / ("ab" + "0" * 62 + ".bin")).exists()
    assert {path: path.read_bytes() for path in theirs} == theirs


# --- 2. one run per directory ----------------------------------------------------


def test_a_second_prepare_on_a_locked_dataset_is_refused(tmp_path, env):
    src = text_corpus(tmp_path / "src")
    out = tmp_path / "ds"
    prepare([src], out, VOCAB, progress=False)
    (src / "new.txt").write_text("more text\n" * 50)
    before = snapshot(out)
    with locks.locked(out):
        r = cli(["prepare", str(src), "--out", str(out), "--vocab-size", str(VOCAB), "--no-progress"], env)
    assert_refused(r, f"{out} is in use by process {os.getpid()}")
    assert snapshot(out) == before


def test_a_second_train_on_a_running_run_directory_is_refused(tmp_path, own_env):
    src = text_corpus(tmp_path / "src")
    run = tmp_path / "run"
    args = ["train", str(src), *TINY, "--epochs", "10000", "--max-steps", "1000000", "--save-interval", "2",
            "--keep", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "crystalline", *args, "--checkpoint-dir", str(run)],
                            env=own_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = run / locks.LOCK_NAME
        wait_until(lambda: lock.exists() and lock.read_text().strip() == str(proc.pid), "the first run's lock")
        wait_until(lambda: checkpoint.list_checkpoints(run), "the first run's checkpoint")
        assert_refused(cli([*args, "--checkpoint-dir", str(run)], own_env, timeout=60),
                       f"{run} is in use by process {proc.pid}")
        assert_refused(cli(["train", "--resume", str(run), *RESUME], own_env, timeout=60),
                       f"{run} is in use by process {proc.pid}")
        assert_refused(cli(["models", "delete", str(run), "--yes"], own_env, timeout=60),
                       f"{run} is in use by process {proc.pid}")
        assert_refused(cli(["models", "delete", str(checkpoint.list_checkpoints(run)[0]), "--yes"], own_env,
                           timeout=60), f"{run} is in use by process {proc.pid}")
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()

    # the cache dataset `train` prepares is locked too; a run refused while
    # setting up leaves no run directory behind
    (dataset,) = cache_root(own_env).iterdir()
    other = tmp_path / "other"
    with locks.locked(dataset):
        refused = cli([*args, "--checkpoint-dir", str(other)], own_env)
    assert_refused(refused, f"{dataset} is in use by process {os.getpid()}")
    assert not other.exists()


def test_temporary_names_are_unique_per_process_and_call(tmp_path):
    names = {atomic.temporary_name(tmp_path / "manifest.json") for _ in range(2)}
    assert len(names) == 2
    assert all(f".manifest.json.{os.getpid()}-" in p.name and atomic.is_temporary(p.name) for p in names)


def test_a_watch_run_skips_a_refresh_while_another_run_prepares_its_data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    watched = text_corpus(tmp_path / "watched")
    cfg = TrainConfig(watch=str(watched), vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, seq_len=16, batch_size=4,
                      threads=1, progress=False, checkpoint_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg, Console(file=io.StringIO()))
    trainer.setup()
    (watched / "more.txt").write_text((STDLIB / "glob.py").read_text()[:2500])
    with locks.locked(trainer.dataset.root):
        assert trainer._refresh_watched() is False
    assert trainer._refresh_watched() is True


def test_the_crawl_takes_the_same_lock(tmp_path):
    data_dir = tmp_path / "crawl"
    data_dir.mkdir()
    with locks.locked(data_dir), pytest.raises(locks.InUse, match=f"{data_dir} is in use by process {os.getpid()}"):
        crawl(CrawlConfig(data_dir=data_dir, start_urls=["http://127.0.0.1:9/"], allow_private=True))


# --- 3. metrics.jsonl after a crash ---------------------------------------------


def test_resume_cuts_metrics_back_to_the_checkpoint_and_readers_skip_a_torn_line(tmp_path, env):
    src = text_corpus(tmp_path / "src")
    run = tmp_path / "run"
    ok = cli(["train", str(src), *TINY, "--max-steps", "8", "--save-interval", "4", "--checkpoint-dir", str(run)], env)
    assert ok.returncode == 0, ok.stderr
    full = checkpoint.metrics_records(run)
    # as if killed after step 8's record but before its checkpoint, half-way through step 9's record
    checkpoint.discard(run / "ckpt-00000008")
    with open(run / checkpoint.METRICS, "a") as metrics:
        metrics.write('{"step": 9, "epoch": 1, "lo')
    assert read_metrics(run).steps == list(range(1, 9))

    resumed = cli(["train", "--resume", str(run), *RESUME], env)
    assert resumed.returncode == 0, resumed.stderr
    lines = (run / checkpoint.METRICS).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, 9))  # steps 5 to 8 once, from the resumed run
    assert [r["loss"] for r in records] == [r["loss"] for r in full]

    # garbage anywhere but in a last line cut short is refused, naming the line
    lines[2] = "garbage"
    (run / checkpoint.METRICS).write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=f"{run / checkpoint.METRICS}:3 is not a metrics record"):
        read_metrics(run)


def test_cutting_metrics_keeps_one_record_per_step_the_latest(tmp_path):
    # as versions that did not cut left it: steps 2 and 3 written again after a resume from step 1
    records = [{"step": s, "loss": float(i)} for i, s in enumerate([1, 2, 3, 2, 3, 4])]
    (tmp_path / checkpoint.METRICS).write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
    checkpoint.cut_metrics(tmp_path, 3)
    assert checkpoint.metrics_records(tmp_path) == [records[0], records[3], records[4]]
    assert not [p for p in tmp_path.iterdir() if p.name != checkpoint.METRICS]  # no temporary left


# --- 4. export durability ---------------------------------------------------------


def test_new_directory_fsyncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    final = tmp_path / "export"
    with atomic.new_directory(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"\1" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    inside = [tmp / "model.safetensors", tmp / "sub" / "config.json", tmp / "sub"]
    assert set(inside) <= set(synced)  # fsynced under the temporary name: before the rename
    assert synced.index(tmp) > max(synced.index(p) for p in inside)
    assert synced[-1] == tmp_path  # the rename itself
    assert (final / "sub" / "config.json").read_text() == "{}"


# --- 5. a full disk while saving a checkpoint -----------------------------------


def test_disk_full_while_saving_a_checkpoint_keeps_the_earlier_ones(tmp_path, own_env):
    src = text_corpus(tmp_path / "src")
    run = tmp_path / "run"
    ok = cli(["train", str(src), *TINY, "--max-steps", "10", "--save-interval", "5", "--checkpoint-dir", str(run)],
             own_env)
    assert ok.returncode == 0, ok.stderr
    before = {ck.name: snapshot(ck) for ck in checkpoint.list_checkpoints(run)}
    ck = checkpoint.list_checkpoints(run)[-1]
    model, moments = (ck / checkpoint.MODEL).stat().st_size, (ck / checkpoint.OPTIMIZER).stat().st_size
    limit = (model + moments) // 2  # room for the weights, not for the optimizer's moments
    others = [p for p in [*run.rglob("*"), *cache_root(own_env).rglob("*")]
              if p.is_file() and p.name != checkpoint.OPTIMIZER]
    assert max(p.stat().st_size for p in others) < limit  # everything else the resumed run writes fits

    full = cli_limited(["train", "--resume", str(run), *RESUME, "--max-steps", "20"], own_env, limit)
    assert_refused(full, f"disk full while writing {run / 'ckpt-00000015'}")
    assert f"the last checkpoint, {ck}, is intact" in full.stderr
    assert {ck.name: snapshot(ck) for ck in checkpoint.list_checkpoints(run)} == before
    assert checkpoint.load(run).state.step == 10
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]  # no temporary left behind

    resumed = cli(["train", "--resume", str(run), *RESUME, "--max-steps", "20"], own_env)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load(run).state.step == 20


def test_a_plot_that_cannot_be_finished_leaves_the_earlier_plot(tmp_path, own_env):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    ok = cli(["train", str(text_corpus(tmp_path / "src")), *TINY, "--max-steps", "4", "--checkpoint-dir", str(run)],
             own_env)
    assert ok.returncode == 0, ok.stderr
    assert cli(["plot", str(run)], own_env).returncode == 0
    png = run / "loss.png"
    before = png.read_bytes()
    full = cli_limited(["plot", str(run)], own_env, len(before) // 2)
    assert_refused(full, f"cannot write --out {png}")
    assert png.read_bytes() == before
    assert not [p for p in run.iterdir() if atomic.is_temporary(p.name)]


def test_disk_full_during_export_leaves_no_directory(tmp_path, own_env):
    run = tmp_path / "run"
    ok = cli(["train", str(text_corpus(tmp_path / "src")), *TINY, "--max-steps", "2", "--checkpoint-dir", str(run)],
             own_env)
    assert ok.returncode == 0, ok.stderr
    weights = (checkpoint.list_checkpoints(run)[-1] / checkpoint.MODEL).stat().st_size
    out = tmp_path / "hf"
    assert_refused(cli_limited(["export", str(run), "--out", str(out)], own_env, weights // 2),
                   f"disk full while writing {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "src", "xdg"]  # nothing half-written


# --- 6. a corrupt token file ------------------------------------------------------


def test_token_ids_beyond_the_vocabulary_are_a_corrupt_dataset(tmp_path, own_env):
    src = text_corpus(tmp_path / "src")
    ds = prepare_for_training([src], VOCAB, cache_dir=cache_root(own_env), progress=False)
    tokens = np.memmap(ds.root / ds.train_file, dtype=ds.dtype, mode="r+")
    tokens[7] = 65535
    tokens.flush()
    del tokens
    r = cli(["train", str(src), *TINY, "--max-steps", "2", "--checkpoint-dir", str(tmp_path / "run")], own_env)
    assert_refused(r, f"the prepared dataset {ds.root} is corrupt: {ds.train_file} holds token id 65535")
    assert f"delete {ds.root} and run again" in r.stderr


# --- 7. kill -9 at random moments under the locks --------------------------------


def test_kill_9_at_random_moments_then_resume_ends_bit_identical(tmp_path, env):
    src = text_corpus(tmp_path / "src")
    args = [str(src), *TINY, "--max-steps", "60", "--save-interval", "2", "--eval-interval", "20"]
    ok = cli(["train", *args, "--checkpoint-dir", str(tmp_path / "full")], env)
    assert ok.returncode == 0, ok.stderr
    run = tmp_path / "cut"
    rng = random.Random(3)
    for _ in range(4):
        if checkpoint.list_checkpoints(run):
            argv = ["train", "--resume", str(run), *RESUME]
        else:
            argv = ["train", *args, "--checkpoint-dir", str(run)]
        target = steps_recorded(run) + rng.randint(1, 12)
        proc = subprocess.Popen([sys.executable, "-m", "crystalline", *argv], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: steps_recorded(run) >= target or proc.poll() is not None, f"step {target}")
        proc.kill()
        assert proc.wait() == -9, "the run ended before it was killed"
        # the dead process's PID stays in the lock file; the next run is not blocked by it
        assert (run / locks.LOCK_NAME).read_text().strip() == str(proc.pid)
    final = cli(["train", "--resume", str(run), *RESUME], env)
    assert final.returncode == 0, final.stderr

    def measures(run_dir: Path) -> list[dict]:
        return [{k: r.get(k) for k in MEASURES} for r in checkpoint.metrics_records(run_dir)]

    assert measures(run) == measures(tmp_path / "full")
    a, b = checkpoint.load(run), checkpoint.load(tmp_path / "full")
    assert a.state.step == b.state.step == 60
    for saved, expected in ((a.params, b.params), (a.m, b.m), (a.v, b.v)):
        assert saved.keys() == expected.keys()
        assert all(np.array_equal(saved[k], expected[k]) for k in saved)
