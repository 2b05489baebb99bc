"""Planning a run before starting it: the model's vocabulary is the one its
tokenizer really has, `train` and `size` estimate the run's time from a
probe, `size` names where its config came from and the command that trains
its recommendation, and `crystalline cache` lists and clears the datasets
that `train` and `size` prepared (and nothing else)."""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from dataclasses import replace
from pathlib import Path

import pytest

from crystalline import _core, checkpoint, locks
from crystalline.config import ModelConfig, TrainConfig
from crystalline.data import cache
from crystalline.data import prepare as prep
from crystalline.estimate import LONG_S, Estimate, Probe, advice, critical_path, duration, flops_per_token
from crystalline.train import Trainer
from commandline import cli

SHAPE = ["--embed-dim", "32", "--num-layers", "1", "--num-heads", "2", "--seq-len", "32", "--batch-size", "4"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A few hundred tokens' worth of distinct text: far too little for a 30,000-token vocabulary."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(60)))
    return src


@pytest.fixture
def own_env(tmp_path) -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1")
    env.pop("CRYSTALLINE_CACHE", None)
    return env


def datasets(env: dict) -> list[Path]:
    return sorted((Path(env["XDG_CACHE_HOME"]) / "crystalline" / "datasets").iterdir())


# --- 1. the vocabulary -------------------------------------------------------------------


def test_a_corpus_too_small_for_the_vocabulary_gets_a_model_of_the_tokenizers_size(tmp_path, corpus, own_env):
    run = tmp_path / "run"
    r = cli(["train", str(corpus), "--vocab-size", "30000", *SHAPE, "--max-steps", "3", "--no-progress",
             "--sample-tokens", "0", "--checkpoint-dir", str(run)], own_env)
    assert r.returncode == 0, r.stderr
    real = int(re.search(r"the corpus only supports (\d+) tokens, fewer than --vocab-size 30000; "
                         r"the model will use (\1)", r.stderr)[1])
    assert 256 < real < 30000
    model = ModelConfig(vocab_size=real, n_embd=32, n_layer=1, n_head=2, block_size=32)
    assert f"model: {model.num_parameters():,} parameters (V={real}, C=32," in r.stderr
    state = checkpoint.read_state(checkpoint.resolve(run))
    assert state.model == model and state.config.vocab_size == real
    info = cli(["models", "info", str(run)], own_env)
    assert f"V={real} C=32" in info.stdout and f'"vocab_size": {real},' in info.stdout
    size = cli(["size", str(corpus), "--vocab-size", "30000", *SHAPE, "--no-estimate", "--no-progress"], own_env)
    assert size.returncode == 0, size.stderr
    assert f"config         vocab {real:,}, embed 32" in size.stdout
    assert f"parameters     {model.num_parameters():,}" in size.stdout
    # resumed, the run finds its dataset again though it now records the real vocabulary: nothing is re-prepared
    (prepared,) = datasets(own_env)
    again = cli(["train", "--resume", str(run), "--max-steps", "5", "--no-progress", "--sample-tokens", "0"], own_env)
    assert again.returncode == 0, again.stderr
    assert datasets(own_env) == [prepared] and "training tokenizer" not in again.stderr
    assert checkpoint.read_state(checkpoint.resolve(run)).step == 5


# --- 2. the estimate ---------------------------------------------------------------------


def test_train_prints_the_estimate_before_step_1_from_a_probe_of_its_config(tmp_path, corpus, own_env):
    lines = []
    cfg = TrainConfig(data=[str(corpus)], vocab_size=300, n_embd=64, n_layer=2, n_head=4, seq_len=32, batch_size=8,
                      max_steps=60, epochs=100, threads=2, eval_interval=1000, sample_tokens=0, progress=False,
                      checkpoint_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    trainer.console.print = lambda *a, **k: lines.append(" ".join(map(str, a)))
    run = trainer.run()
    first_step = next(i for i, line in enumerate(lines) if "train loss" in line or "Distribution" in line)
    said = next(i for i, line in enumerate(lines) if "estimate: " in line)
    assert said < first_step and "whole run (60 steps) about" in lines[said]
    assert "estimate source: timed:" in lines[said + 1] and "steps of this config on 2 threads" in lines[said + 1]
    est = trainer.estimate
    assert est.total_steps == run.steps == 60
    # the probe timed real steps of this config; how near its figure comes to
    # the run's time depends on the load, so benches/estimate.py measures that
    assert est.probe.steps >= 2 and est.probe.threads == 2 and 0 < est.probe.step_s < est.probe.wall_s


def test_train_no_estimate_skips_the_probe_and_a_resume_may_turn_it_back_on(tmp_path, corpus, own_env):
    run = tmp_path / "run"
    args = ["train", str(corpus), "--vocab-size", "300", *SHAPE, "--no-progress", "--sample-tokens", "0",
            "--checkpoint-dir", str(run)]
    quiet = cli([*args, "--max-steps", "3", "--no-estimate"], own_env)
    assert quiet.returncode == 0, quiet.stderr
    assert "[Node Zero] estimate" not in quiet.stderr and "done: 3 steps" in quiet.stderr
    kept = cli(["train", "--resume", str(run), "--max-steps", "6", "--no-progress"], own_env)
    assert kept.returncode == 0 and "[Node Zero] estimate" not in kept.stderr  # as the run was started
    resumed = cli(["train", "--resume", str(run), "--max-steps", "9", "--no-progress", "--estimate"], own_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "[Node Zero] estimate: " in resumed.stderr and "estimate source: timed:" in resumed.stderr
    assert "done: 9 steps" in resumed.stderr


def test_a_runs_time_is_its_steps_and_its_validations():
    probe = Probe(step_s=2.0, eval_s=0.5, steps=3, threads=12, wall_s=7.0)
    est = Estimate(probe, steps_per_epoch=100, total_steps=450, done=0, eval_interval=200, val_batches=4)
    assert est.epoch_s == 100 * 2.0 + 1 * 4 * 0.5
    assert est.run_s == 450 * 2.0 + 3 * 4 * 0.5  # validations at 200, 400 and the end
    assert "whole run (450 steps) about 15 min" in est.lines(1000)[0]
    assert "timed: 3 steps of this config on 12 threads here, a 7.0 s probe" in est.lines(1000)[1]
    open_ended = replace(est, total_steps=None)
    assert open_ended.run_s is None and "open-ended" in open_ended.lines(1000)[0]
    assert [duration(s) for s in (0, 0.2, 45, 200, 1200, 12_000, 200_000)] == [
        "0 s", "<1 s", "45 s", "3 min 20 s", "20 min", "3 h 20 min", "2 d 7 h"]


def test_a_long_run_is_told_what_would_shorten_it_with_figures():
    big = ModelConfig(vocab_size=30000, n_embd=512, n_layer=8, n_head=16, block_size=128)
    small = ModelConfig(vocab_size=30000, n_embd=256, n_layer=4, n_head=8, block_size=128)
    probe = Probe(step_s=10.0, eval_s=3.0, steps=2, threads=12, wall_s=30.0)
    est = Estimate(probe, steps_per_epoch=1000, total_steps=3000, done=0, eval_interval=10_000, val_batches=0)
    lines = advice(est, big, 128, 12, 32, small)
    scaled = est.run_s * flops_per_token(small, 128) / flops_per_token(big, 128)
    assert lines[0].startswith("a smaller model") and f"about {duration(scaled)}" in lines[0]
    assert f"{small.num_parameters():,} parameters" in lines[0]
    now = _core.available_cores()  # twice the cores, scaled by the busiest lane of the step's plan
    faster = critical_path(12, 2 * now, 32, 128) / critical_path(12, now, 32, 128)
    assert faster < 1 and f"more cores: on {2 * now} instead of {now}, the run would take about " \
                          f"{duration(est.run_s * faster)} at best" in lines[1]
    short = replace(est, total_steps=int(LONG_S / 10) - 1)
    assert advice(short, big, 128, 12, 32, small) == []


# --- 3. size ------------------------------------------------------------------------------


def test_size_names_its_configs_source_and_the_command_that_trains_the_recommendation(tmp_path, corpus, own_env):
    auto = cli(["size", str(corpus), "--no-progress"], own_env)
    assert auto.returncode == 0, auto.stderr
    assert "source         auto: the recommended shape for this data" in auto.stdout
    assert re.search(r"note: preparing a dataset of [\d.]+ MB of text in .*: about [\d,]+ MB on disk", auto.stderr)
    assert re.search(r"time           [\d.e-]+ s/step, [\d,]+ tokens/s; one epoch \(\d+ steps\) about", auto.stdout)
    assert "estimate source: timed:" in auto.stdout
    assert "why: the largest shape up to the design table's" in auto.stdout and "it is the config above" in auto.stdout
    rec = re.search(r"recommended    vocab ([\d,]+), embed (\d+), layers (\d+), heads (\d+), block (\d+): ([\d,]+) "
                    r"parameters", auto.stdout)
    # the command it prints trains exactly that model, on the dataset already prepared
    command = shlex.split(re.search(r"train it with  (.*)", auto.stdout)[1])
    assert command[:3] == ["crystalline", "train", str(corpus)]
    before = datasets(own_env)
    from_dataset = cli(["size", str(before[0]), "--no-estimate"], own_env)  # the cache's dataset itself: the same
    assert re.search(r"train it with  (.*)", from_dataset.stdout)[1] == shlex.join(command)
    r = cli([*command[1:], "--max-steps", "1", "--no-progress", "--sample-tokens", "0",
             "--checkpoint-dir", str(tmp_path / "run")], own_env)
    assert r.returncode == 0, r.stderr
    vocab, embd, layers, heads, block, params = rec.groups()
    assert (f"model: {params} parameters (V={vocab.replace(',', '')}, C={embd}, L={layers}, NH={heads}, "
            f"T={block})") in r.stderr
    assert datasets(own_env) == before
    flags = cli(["size", str(corpus), *SHAPE, "--no-progress", "--no-estimate"], own_env)
    assert ("source         flags --embed-dim 32 --num-layers 1 --num-heads 2 --batch-size 4 --seq-len 32 "
            "over the quick preset; vocab from the tokenizer") in flags.stdout
    assert "differs from the config above" in flags.stdout and "time  " not in flags.stdout
    assert "note: preparing a dataset" in flags.stderr  # for the quick preset's vocabulary, as `train` would
    again = cli(["size", str(corpus), *SHAPE, "--no-progress", "--no-estimate"], own_env)
    assert re.search(r"note: using the dataset in .* \([\d.]+ MB\)", again.stderr)
    (tmp_path / "model.toml").write_text("embed-dim = 48\nnum_heads = 3\n")
    toml = cli(["size", str(corpus), "--config", str(tmp_path / "model.toml"), "--no-progress", "--no-estimate"],
               own_env)
    assert f"source         --config {tmp_path / 'model.toml'} over the quick preset" in toml.stdout


# --- 4. the cache ---------------------------------------------------------------------------


def test_cache_lists_and_clears_only_the_datasets_it_made(tmp_path, corpus, own_env):
    for vocab in ("300", "400"):
        r = cli(["size", str(corpus), "--vocab-size", vocab, "--no-progress", "--no-estimate"], own_env)
        assert r.returncode == 0, r.stderr
    old, new = datasets(own_env)
    root = old.parent
    foreign = root / "my-notes"  # not a dataset
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    lookalike = root / "0123456789abcdef"  # named like one, marked like one, but holding a file prepare never makes
    lookalike.mkdir()
    (lookalike / prep.MANIFEST).write_text(json.dumps({"format": prep.FORMAT}))
    (lookalike / "notes.txt").write_text("mine")
    week = time.time() - 8 * 86400
    os.utime(old / prep.MANIFEST, (week, week))

    listed = cli(["cache"], own_env)
    assert listed.returncode == 0, listed.stderr
    for ds in (old, new):
        manifest = prep.read_manifest(ds)
        line = next(line for line in listed.stdout.splitlines() if line.startswith(ds.name))
        assert f"vocab {manifest['vocab_size']:,}" in line and str(corpus) in line
        assert f"{sum(p.stat().st_size for p in ds.rglob('*') if p.is_file()) / 1e6:,.1f} MB" in line
    assert "used 8 d ago" in listed.stdout
    for other in (foreign, lookalike):
        assert re.search(rf"{other.name} .*not a crystalline dataset: left alone", listed.stdout)

    declined = cli(["cache", "clear"], own_env, input="n\n")
    assert declined.returncode == 1 and "nothing deleted" in declined.stderr
    assert old.exists() and new.exists()
    aged = cli(["cache", "clear", "--older-than", "7d", "--yes"], own_env)
    assert aged.returncode == 0, aged.stderr
    assert not old.exists() and new.exists()
    with locks.using(new):  # a training run reads it: kept
        busy = cli(["cache", "clear", "--yes"], own_env)
    assert busy.returncode == 0 and f"skipped: {new} is in use by a training run" in busy.stderr
    assert new.exists() and prep.read_manifest(new) is not None
    done = cli(["cache", "clear", "--yes"], own_env)
    assert done.returncode == 0 and "deleted 1 dataset(s)" in done.stdout
    assert sorted(p.name for p in root.iterdir()) == [lookalike.name, foreign.name]
    assert (foreign / "notes.txt").read_text() == "mine" and (lookalike / "notes.txt").read_text() == "mine"
    assert (lookalike / prep.MANIFEST).is_file()
    bad = cli(["cache", "clear", "--older-than", "soon"], own_env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --older-than 'soon' is not an age")


def test_the_cache_is_under_crystalline_cache_or_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CRYSTALLINE_CACHE", raising=False)
    assert prep.default_cache_dir() == tmp_path / "xdg" / "crystalline" / "datasets"
    monkeypatch.setenv("CRYSTALLINE_CACHE", str(tmp_path / "own"))
    assert prep.default_cache_dir() == tmp_path / "own" / "datasets"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello world " * 200)
    ds = prep.prepare_for_training([src], 300, progress=False)
    assert ds.root.parent == tmp_path / "own" / "datasets"
    (entry,) = cache.scan()
    assert entry.path == ds.root and entry.ours and entry.inputs == str(src)
    cache.remove(entry)
    assert cache.scan() == []


def test_the_progress_bar_s_epoch_time_left_ends_with_the_run():
    bar = Trainer.__new__(Trainer)  # only the counters _etas reads
    bar.steps_per_epoch, bar.pos, bar.step, bar.total_steps = 4373, 3990, 3990, 4000
    assert bar._etas(1.0) == {"epoch_eta": duration(10), "run_eta": duration(10)}
    bar.total_steps = None  # a --watch run: the epoch's own end
    assert bar._etas(1.0) == {"epoch_eta": duration(383), "run_eta": "open-ended"}
