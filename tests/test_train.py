"""`crystalline train` end to end: determinism, resume, Ctrl-C, kill -9 during
a save, --keep, the symmetry-group distribution the core dealt, every sphere
working, metrics.jsonl, clipping, thread counts, the learning-rate schedule,
the presets, --watch, the loss falling on real text, and each refusal. Tiny
models keep it quick."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from crystalline import Model, _core, checkpoint, load
from crystalline.errors import UserError
from crystalline.plot import read_metrics
from crystalline.config import PRESETS, ModelConfig, TrainConfig, build_config
from crystalline.data import corpus, sizing
from crystalline.train import Trainer, lr_at
from commandline import cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = ["--vocab-size", "300", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "2",
        "--batch-size", "8", "--seq-len", "32", "--no-progress", "--sample-tokens", "0", "--ext", ".py"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_and_threads_give_a_bit_identical_loss_curve(tmp_path, env):
    args = ["train", str(STDLIB / "json"), *TINY, "--max-steps", "12", "--threads", "5", "--seed", "3"]
    for name in ("a", "b"):
        r = cli([*args, "--checkpoint-dir", str(tmp_path / name)], env)
        assert r.returncode == 0, r.stderr
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 12 and a == b
    assert len(set(a)) > 1


def poll_until(check, what: str, proc: subprocess.Popen | None = None, timeout: float = 120):
    """check()'s first true value, looked for every 50 ms for at most
    `timeout` seconds; fails early if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def latest_step(run: Path) -> int:
    found = checkpoint.list_checkpoints(run)
    return int(found[-1].name[len(checkpoint.PREFIX) :]) if found else 0


def test_sigint_saves_exits_130_and_resume_continues_bit_identically(tmp_path, env):
    args = ["train", str(STDLIB / "json"), *TINY, "--epochs", "5", "--threads", "3", "--save-interval", "1000"]
    full = cli([*args, "--checkpoint-dir", str(tmp_path / "full")], env)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "crystalline", *args, "--checkpoint-dir", str(run)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    poll_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 20, "20 steps", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: saved" in err
    assert f"continue with `crystalline train --resume {run}`" in err  # the command the README gives, run below
    cut_at = len(losses(run))
    assert 20 <= cut_at < 460
    assert checkpoint.list_checkpoints(run)[-1].name == f"ckpt-{cut_at:08d}"
    resumed = cli(["train", "--resume", str(run), "--no-progress", "--sample-tokens", "0"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(tmp_path / "full")


def test_kill_9_during_saves_never_leaves_a_bad_checkpoint_and_each_resume_goes_on(tmp_path, env):
    run = tmp_path / "run"
    first = ["train", str(STDLIB / "json"), *TINY, "--epochs", "30", "--threads", "2", "--save-interval", "1",
             "--keep", "2", "--checkpoint-dir", str(run)]
    resume = ["train", "--resume", str(run), "--no-progress", "--sample-tokens", "0"]
    reached = 0
    for attempt in range(3):
        log = tmp_path / f"attempt{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "crystalline", *(resume if reached else first)], env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
            try:  # a checkpoint is saved every step: kill it three saves on, likely inside one
                poll_until(lambda: latest_step(run) >= reached + 3, f"three saves after step {reached}", proc)
                assert proc.poll() is None, log.read_text()
            finally:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, log.read_text()
        if reached:
            assert f"resumed from {run / f'ckpt-{reached:08d}'}" in log.read_text()
        found = checkpoint.list_checkpoints(run)
        assert found and latest_step(run) >= reached + 3
        for ck in found:  # every complete checkpoint directory verifies and loads
            assert checkpoint.load(ck).state.step == int(ck.name[len(checkpoint.PREFIX) :])
        reached = latest_step(run)
    # what a crash may leave: a half-written checkpoint; and a file of the user's
    leftover = run / f"{checkpoint.TMP_PREFIX}crashed"
    leftover.mkdir(exist_ok=True)
    (leftover / checkpoint.MODEL).write_bytes(b"half")
    (run / "notes.txt").write_text("mine")
    done = cli([*resume, "--max-steps", str(reached + 3)], env)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in checkpoint.list_checkpoints(run)] == [f"ckpt-{reached + 2:08d}", f"ckpt-{reached + 3:08d}"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(checkpoint.TMP_PREFIX)]
    assert (run / "notes.txt").read_text() == "mine"


def sphere_lines(stderr: str) -> dict[int, int]:
    return {int(m[1]): int(m[2]) for m in re.finditer(r"\[Sphere (\d+)\] (\d+) sequences, busy", stderr)}


def dealt_by_epoch(stderr: str) -> list[tuple[int, int, list[int]]]:
    """(first step, last step, sequences per group) of each epoch's distribution."""
    out = []
    for m in re.finditer(r"Distribution by symmetry group \(epoch \d+/\d+, steps (\d+)-(\d+)\), sequences dealt:\n"
                         r"((?:  Group +\d+: \d+ sequences .*\n){12})", stderr):
        out.append((int(m[1]), int(m[2]), [int(n) for n in re.findall(r": (\d+) sequences", m[3])]))
    return out


def test_what_the_core_dealt_is_even_per_epoch_and_every_sphere_works(tmp_path, env):
    # every document the same few characters: the token ids sit in one or two groups
    data = tmp_path / "skewed"
    data.mkdir()
    for i in range(6):
        (data / f"f{i}.txt").write_text("aaaa " * 300)
    batch = 14  # not a multiple of 12: the groups' shares rotate from step to step
    r = cli(["train", str(data), "--vocab-size", "260", "--embed-dim", "16", "--num-layers", "1",
             "--num-heads", "2", "--batch-size", str(batch), "--seq-len", "16", "--epochs", "2", "--threads", "12",
             "--val-fraction", "0", "--no-progress", "--sample-tokens", "0", "--verbose",
             "--checkpoint-dir", str(tmp_path / "run")], env)
    assert r.returncode == 0, r.stderr
    per_epoch = int(re.search(r"([\d,]+) steps per epoch", r.stderr)[1].replace(",", ""))
    epochs = dealt_by_epoch(r.stderr)
    assert [(a, b) for a, b, _ in epochs] == [(1, per_epoch), (per_epoch + 1, 2 * per_epoch)]
    n = per_epoch * batch
    assert n % 12, "the epoch should not divide evenly, or a rotation carried over would not show"
    for _, _, groups in epochs:  # each epoch's deal starts again at group 0
        assert groups == [n // 12 + (g < n % 12) for g in range(12)]
    spheres = sphere_lines(r.stderr)
    assert sorted(spheres) == list(range(1, 12))
    assert all(k > 0 for k in spheres.values()), spheres
    assert sum(spheres.values()) == n  # the second epoch's sphere lines: its every sequence, once
    assert "Epoch 2/2 complete, average loss:" in r.stderr
    # --verbose: a line per sphere per step
    assert len(re.findall(r"\[Sphere \d+\] Forward pass complete, loss=\d+\.\d{4}", r.stderr)) == 2 * per_epoch * 11


def test_loss_falls_well_below_log_vocab_on_real_text(tmp_path, env):
    run = tmp_path / "run"
    r = cli(["train", str(STDLIB / "email"), "--ext", ".py", "--vocab-size", "512", "--embed-dim", "64",
             "--num-layers", "2", "--num-heads", "4", "--batch-size", "16", "--seq-len", "64",
             "--learning-rate", "3e-3", "--max-steps", "150", "--warmup-steps", "20", "--eval-interval", "50",
             "--threads", "4", "--no-progress", "--sample-tokens", "30", "--checkpoint-dir", str(run)], env)
    assert r.returncode == 0, r.stderr
    curve = losses(run)
    assert curve[0] > np.log(512) - 0.3
    assert np.mean(curve[-10:]) < np.log(512) - 2.0
    vals = [json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert len(vals) == 3 and vals[-1] < vals[0]
    assert "sample from the trained model" in r.stderr and r.stdout.strip()
    ck = checkpoint.load(run)
    assert set(ck.params) >= {"wte.weight", "h.0.attn.c_attn.weight", "ln_f.bias"}
    assert (ck.path / "tokenizer.json").is_file()


@pytest.mark.parametrize("preset", ["small", "seed", "auto"])
def test_presets_train_their_shape_end_to_end(preset, tmp_path, env):
    # the preset's model and schedule, on a batch of one sequence per symmetry group to keep it quick
    data, run, batch = STDLIB / "json", tmp_path / "run", 12
    r = cli(["train", str(data), "--ext", ".py", "--preset", preset, "--batch-size", str(batch), "--max-steps", "2",
             "--no-progress", "--sample-tokens", "0", "--checkpoint-dir", str(run)], env)
    assert r.returncode == 0, r.stderr
    settings = replace(TrainConfig(), **{**PRESETS.get(preset, {}), "batch_size": batch})
    if preset == "auto":  # the design table's vocabulary for the data size, then the shape its tokens support
        data_bytes = corpus.total_bytes([data], [".py"])
        tokens = int(re.search(r"data: ([\d,]+) training tokens", r.stderr)[1].replace(",", ""))
        shape = replace(sizing.recommend(tokens, data_bytes), vocab_size=sizing.vocab_for(data_bytes),
                        block_size=settings.seq_len)
    else:
        shape = settings.model_config()
    assert f"{batch * settings.seq_len:,} tokens per step" in r.stderr
    assert [json.loads(line)["lr"] for line in (run / checkpoint.METRICS).read_text().splitlines()] == [
        lr_at(step, settings, 2) for step in range(2)]
    # a corpus this small cannot fill the vocabulary: train says so, and the model gets the tokenizer's
    model = load(run)
    tokenizer = model.tokenizer.vocab_size
    assert tokenizer < shape.vocab_size
    assert (f"the corpus only supports {tokenizer} tokens, fewer than --vocab-size {shape.vocab_size}; "
            f"the model will use {tokenizer}") in r.stderr
    shape = replace(shape, vocab_size=tokenizer)
    ck = checkpoint.load(run)
    assert ck.state.step == 2 and ck.state.model == shape and ck.state.config.vocab_size == tokenizer
    assert model.logits([1, 2, 3]).shape == (3, tokenizer)
    assert (f"model: {shape.num_parameters():,} parameters (V={shape.vocab_size}, C={shape.n_embd}, "
            f"L={shape.n_layer}, NH={shape.n_head}, T={shape.block_size})") in r.stderr


def refuse(args: list[str], env: dict, pattern: str, code: int = 2) -> str:
    r = cli(["train", *args], env)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and "panicked" not in r.stderr
    assert re.search(pattern, r.stderr), r.stderr
    return r.stderr


def test_refusals_are_one_clear_message_and_exit_2(tmp_path, env):
    small = tmp_path / "small.py"
    small.write_text("tiny text " * 20)
    ck = str(tmp_path / "r")
    refuse([str(small), *TINY, "--checkpoint-dir", ck, "--batch-size", "64"], env,
           r"Dataset too small: need 2,049 tokens, have \d+")
    refuse([str(STDLIB / "json"), *TINY, "--checkpoint-dir", ck, "--num-heads", "3"], env,
           r"--embed-dim 32 is not divisible by --num-heads 3")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refuse([str(STDLIB / "json"), *TINY, "--checkpoint-dir", str(a_file)], env, r"is a file")
    refuse([str(tmp_path / "missing"), *TINY, "--checkpoint-dir", ck], env, r"does not exist")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("batch_size = [")
    refuse([str(STDLIB / "json"), "--config", str(bad_toml)], env, r"not valid TOML")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("batchsize = 3\n")
    refuse([str(STDLIB / "json"), "--config", str(unknown)], env, r"unknown setting\(s\) batchsize")
    refuse(["--resume", "--no-progress"], env, r"--resume needs the run")
    for cores in ("0", "-2", "1025"):
        refuse([str(STDLIB / "json"), *TINY, "--checkpoint-dir", ck, "--cores", cores], env,
               rf"--cores must be from 1 to 1024, got {cores}$")


def test_vocab_mismatch_existing_run_and_corrupt_checkpoint_are_refused(tmp_path, env):
    run = tmp_path / "run"
    ok = cli(["train", str(STDLIB / "json"), *TINY, "--max-steps", "3", "--checkpoint-dir", str(run)], env)
    assert ok.returncode == 0, ok.stderr
    tok = checkpoint.resolve(run) / "tokenizer.json"
    refuse([str(STDLIB / "json"), *TINY, "--tokenizer", str(tok), "--vocab-size", "400",
            "--checkpoint-dir", str(tmp_path / "other")], env, r"vocabulary of 300 but --vocab-size 400")
    refuse([str(STDLIB / "json"), *TINY, "--checkpoint-dir", str(run)], env, r"already holds a run; add --resume")
    refuse(["--resume", str(run), "--no-progress", "--learning-rate", "0.5"], env,
           r"a resumed run keeps its settings; --learning-rate cannot change")
    weights = checkpoint.resolve(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refuse(["--resume", str(run), "--no-progress"], env, re.escape(str(weights)) + r" is corrupt or truncated")


def test_diverging_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path, env):
    run = tmp_path / "run"
    ok = cli(["train", str(STDLIB / "json"), *TINY, "--max-steps", "4", "--save-interval", "2",
              "--checkpoint-dir", str(run)], env)
    assert ok.returncode == 0, ok.stderr
    # poison the latest weights (keeping the checkpoint's own hashes valid) and resume
    ck = checkpoint.load(run)
    ck.params["h.0.ln_1.weight"][:] = np.nan
    checkpoint.save(run, ck.params, ck.m, ck.v, ck.state, ck.path / "tokenizer.json", keep=3)
    before = sorted(p.name for p in checkpoint.list_checkpoints(run))
    err = refuse(["--resume", str(run), "--no-progress", "--max-steps", "8"], env,
                 r"training diverged at step 5: non-finite loss", code=3)
    assert "Lower --learning-rate" in err
    assert sorted(p.name for p in checkpoint.list_checkpoints(run)) == before


def test_config_layers_preset_file_and_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('batch-size = 4\nlearning_rate = 0.01\npreset = "tiny"\n')
    cfg = build_config({"learning_rate": 0.02}, f)
    assert (cfg.batch_size, cfg.learning_rate, cfg.n_embd, cfg.preset) == (4, 0.02, 128, "tiny")
    quick = build_config({}, None, preset="quick")
    assert quick.max_steps is not None
    assert build_config({"epochs": 3}, None, preset="quick").max_steps is None
    with pytest.raises(UserError, match="unknown preset"):
        build_config({"preset": "huge"})


def test_legacy_names_in_toml_and_saved_state_map_to_the_model_names(tmp_path):
    f = tmp_path / "old.toml"
    f.write_text("embed-dim = 48\nnum_layers = 2\nnum_heads = 3\n")
    cfg = build_config({}, f)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head) == (48, 2, 3)
    saved = {"embed_dim": 64, "num_layers": 3, "num_heads": 8, "seq_len": 32, "a_setting_since_removed": 1}
    old = TrainConfig.from_dict(saved)
    assert (old.n_embd, old.n_layer, old.n_head, old.seq_len) == (64, 3, 8, 32)
    assert old.model_config() == ModelConfig(4096, 64, 3, 8, 32)


def test_learning_rate_warms_up_then_decays_by_cosine_and_holds_the_peak_when_watching():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    # linear from peak/warmup to the peak, cosine to 0.1 of it at the last step (0-based step 110 of 110)
    planned = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 35: 0.86819805, 60: 0.55, 85: 0.23180195, 110: 0.1, 200: 0.1}
    for step, lr in planned.items():
        assert lr_at(step, cfg, 110) == pytest.approx(lr), step
    for step, lr in {0: 0.1, 9: 1.0, 10: 1.0, 60: 1.0, 10**7: 1.0}.items():  # no end: the peak holds
        assert lr_at(step, cfg, None) == pytest.approx(lr), step


def tiny_config(run_dir: Path, **settings) -> TrainConfig:
    """A TrainConfig for a tiny model on the json package's source."""
    base = dict(data=[str(STDLIB / "json")], extensions=[".py"], vocab_size=300, n_embd=32, n_layer=1, n_head=2,
                batch_size=8, seq_len=32, threads=1, progress=False, sample_tokens=0, checkpoint_dir=str(run_dir))
    return TrainConfig(**{**base, **settings})


@pytest.fixture
def cache(monkeypatch, env):
    """In-process training shares the module's private prepare cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])


def first_step_gradient(trainer: Trainer) -> tuple[float, dict[str, np.ndarray]]:
    """The loss and gradients of the run's first batch at its initial
    weights, computed apart from the trainer by a Model of the same seed."""
    cfg = trainer.cfg
    model = Model(**asdict(cfg.model_config()), seed=cfg.seed)
    batch = trainer.batch(0, 0)
    loss, grads = model.loss_and_grad(batch[:, :-1], batch[:, 1:])
    return loss, {k: g.astype(np.float64) for k, g in grads.items()}


def global_norm(grads: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float((g * g).sum()) for g in grads.values()))


def test_a_ctrl_c_handled_after_a_steps_save_check_is_still_saved(tmp_path, cache):
    # Python runs the SIGINT handler wherever the main thread is: here, as the
    # progress bar is updated after step 3 decided not to save
    trainer = Trainer(tiny_config(tmp_path / "run", max_steps=50, save_interval=1000))
    etas = trainer._etas

    def ctrl_c_at_step_3(step_s: float) -> dict:
        if trainer.step == 3:
            trainer._on_sigint(signal.SIGINT, None)
        return etas(step_s)

    trainer._etas = ctrl_c_at_step_3
    run = trainer.run()
    # the next step sees the flag, saves and ends the run
    assert run.interrupted and run.steps == 4
    assert run.last_checkpoint == checkpoint.list_checkpoints(tmp_path / "run")[-1]
    assert latest_step(tmp_path / "run") == 4


def test_python_api_trains_saves_a_loadable_checkpoint_and_samples_it(tmp_path, cache):
    cfg = tiny_config(tmp_path / "api", max_steps=30, learning_rate=1e-2, warmup_steps=3, sample_tokens=5)
    trainer = Trainer(cfg)
    run = trainer.run()
    assert run.steps == 30 and len(run.losses) == 30 and not run.interrupted
    assert run.losses[0] > math.log(300) - 0.3 and np.mean(run.losses[-5:]) < run.losses[0] - 1.0
    assert run.last_checkpoint == checkpoint.list_checkpoints(tmp_path / "api")[-1]
    model = load(run.last_checkpoint)
    for name, weights in trainer.trainer.parameters().items():
        assert np.array_equal(model.parameters()[name], weights), name
    # the sample: the built-in prompt's last tokens that fit in half the block
    # size, and what the saved model writes after them
    ids = model.tokenizer.encode("import os\nimport sys\n\n\ndef ")[-(cfg.seq_len // 2):]
    prompt = model.tokenizer.decode(ids)
    assert run.sample == prompt + model.generate(prompt, max_tokens=5, temperature=0.8, top_k=40, seed=cfg.seed)


def test_metrics_jsonl_records_every_step_as_the_readme_says(tmp_path, cache):
    cfg = tiny_config(tmp_path / "run", max_steps=6, eval_interval=3, warmup_steps=2, learning_rate=1e-2, threads=3)
    trainer = Trainer(cfg)
    run = trainer.run()
    records = [json.loads(line) for line in (run.run_dir / checkpoint.METRICS).read_text().splitlines()]
    fields = {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "sphere_busy_s", "compute_s",
              "group_sequences"}
    assert [set(r) for r in records] == [fields | ({"val_loss"} if step % 3 == 0 else set()) for step in range(1, 7)]
    assert [r["step"] for r in records] == list(range(1, 7)) and {r["epoch"] for r in records} == {1}
    assert [r["loss"] for r in records] == run.losses
    assert [r["lr"] for r in records] == [lr_at(step, cfg, 6) for step in range(6)]
    assert [(r["step"], r["val_loss"]) for r in records if "val_loss" in r] == run.val_losses
    assert all(r["tokens_per_s"] > 0 for r in records)
    for r in records:  # Node Zero runs no micro-batch; both workers do
        assert len(r["sphere_busy_s"]) == 3 and r["sphere_busy_s"][0] == 0.0 and min(r["sphere_busy_s"][1:]) > 0
        assert max(r["sphere_busy_s"]) <= r["compute_s"] < cfg.batch_size * cfg.seq_len / r["tokens_per_s"]
        # every sequence of the batch dealt to one of the 12 symmetry groups
        assert len(r["group_sequences"]) == 12 and sum(r["group_sequences"]) == cfg.batch_size
    loss, grads = first_step_gradient(trainer)
    assert records[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert records[0]["grad_norm"] == pytest.approx(global_norm(grads), rel=1e-4)


def test_grad_clip_scales_the_gradient_to_the_clip_norm(tmp_path, cache):
    clip = 0.05
    for setting in (clip, 0.0):  # 0: off
        trainer = Trainer(tiny_config(tmp_path / str(setting), max_steps=1, threads=2, grad_clip=setting))
        trainer.run()
        _, grads = first_step_gradient(trainer)
        norm = global_norm(grads)
        assert norm > 4 * clip, "the first gradient should be well above the clip"
        scale = clip / norm if setting else 1.0
        # after one step AdamW's first moment is (1 - beta1) times the (clipped) gradient
        m = checkpoint.load(tmp_path / str(setting)).m
        for name, g in grads.items():
            np.testing.assert_allclose(m[name], 0.1 * scale * g, rtol=1e-3, atol=1e-6 * 0.1 * scale * norm,
                                       err_msg=f"{name} with --grad-clip {setting}")


def test_thread_counts_change_the_loss_curve_only_by_rounding(tmp_path, cache):
    curves = {t: Trainer(tiny_config(tmp_path / str(t), max_steps=10, threads=t, learning_rate=1e-2,
                                     warmup_steps=2)).run().losses for t in (1, 2, 7)}
    assert curves[1][-1] < curves[1][0] - 0.3
    for t in (2, 7):
        np.testing.assert_allclose(curves[t], curves[1], rtol=1e-5, err_msg=f"{t} threads")


def test_core_counts_change_the_loss_curve_only_by_rounding_and_a_team_gives_one_core_s_bits(tmp_path, cache):
    # 16 cores make teams (more than the 11 workers), sharing this machine's CPUs
    curves = {c: Trainer(tiny_config(tmp_path / f"c{c}", max_steps=10, threads=12, cores=c, learning_rate=1e-2,
                                     warmup_steps=2)).run().losses for c in (1, 2, 16)}
    assert curves[1][-1] < curves[1][0] - 0.3
    for c in (2, 16):
        np.testing.assert_allclose(curves[c], curves[1], rtol=1e-5, err_msg=f"{c} cores")
    # one worker sphere: its team is every core, and a team's kernels give one core's bits
    alone = [Trainer(tiny_config(tmp_path / f"alone{c}", max_steps=4, threads=2, cores=c)).run().losses for c in (1, 3)]
    assert alone[0] == alone[1]


def test_plot_draws_the_loss_curves(tmp_path, env):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    run = tmp_path / "run"
    ok = cli(["train", str(STDLIB / "json"), *TINY, "--max-steps", "6", "--eval-interval", "3",
              "--checkpoint-dir", str(run)], env)
    assert ok.returncode == 0, ok.stderr
    curves = read_metrics(run)
    assert curves.steps == list(range(1, 7)) and curves.val_steps == [3, 6] and len(curves.val_losses) == 2
    r = cli(["plot", str(run)], env)
    assert r.returncode == 0, r.stderr
    png = run / "loss.png"
    assert r.stdout.strip() == str(png)
    pixels = imread(png)[..., :3]

    def columns_in(colour: str) -> np.ndarray:
        """The x positions of pixels near a matplotlib default colour."""
        rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        return np.nonzero((np.abs(pixels - rgb).max(axis=2) < 0.1).any(axis=0))[0]

    train, val = columns_in("#1f77b4"), columns_in("#ff7f0e")  # C0 and C1: the train and validation lines
    assert train.max() - train.min() > 0.6 * pixels.shape[1]  # the training curve spans steps 1 to 6

    def x(step: int) -> float:
        return train.min() + (step - 1) / 5 * (train.max() - train.min())

    # the validation curve: a marker at step 3, its first, and a line on from there to step 6
    assert abs(val.min() - x(3)) < 8
    assert set(range(round(x(3)) + 8, round(x(6)) - 8)) <= set(val.tolist())
    missing = cli(["plot", str(tmp_path)], env)
    assert missing.returncode == 2 and "has no metrics.jsonl" in missing.stderr


def wait_for(path: Path, pattern: str, proc: subprocess.Popen) -> str:
    """The text of `path` once `pattern` appears in it."""
    return poll_until(lambda: path.exists() and re.search(pattern, path.read_text()) and path.read_text(),
                      f"{pattern!r} in {path}", proc, timeout=90)


@pytest.mark.parametrize("interval", [None, 2])
def test_watch_waits_for_data_then_picks_up_a_file_added_while_it_runs(interval, tmp_path, env):
    watched = tmp_path / "incoming"
    watched.mkdir()
    log = tmp_path / "log.txt"
    args = ["train", "--watch", str(watched), "--vocab-size", "300", "--embed-dim", "32", "--num-layers", "1",
            "--num-heads", "2", "--batch-size", "2", "--seq-len", "32", "--val-fraction", "0", "--warmup-steps", "2",
            "--learning-rate", "1e-3", "--no-progress", "--sample-tokens", "0", "--checkpoint-dir", str(tmp_path / "run")]
    if interval:
        args += ["--watch-interval", str(interval)]
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "crystalline", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
        try:
            wait_for(log, r"waiting for data in", proc)
            # an epoch of a few hundred steps: the second file comes long before its end
            (watched / "first.txt").write_text("".join((STDLIB / "json" / f).read_text() for f in ("decoder.py", "encoder.py")))
            before = wait_for(log, r"data: ([\d,]+) training tokens", proc)
            first_tokens = int(re.search(r"data: ([\d,]+) training tokens", before)[1].replace(",", ""))
            per_epoch = int(re.search(r"([\d,]+) steps per epoch", before)[1].replace(",", ""))
            (watched / "second.txt").write_text((STDLIB / "json" / "scanner.py").read_text())
            text = wait_for(log, r"watch: 1 new or changed file\(s\); now ([\d,]+) training tokens", proc)
            metrics = tmp_path / "run" / checkpoint.METRICS
            poll_until(lambda: len(metrics.read_text().splitlines()) >= 6, "six steps", proc)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    assert proc.returncode == 130, log.read_text()
    now = int(re.search(r"watch: 1 new or changed file\(s\); now ([\d,]+)", text)[1].replace(",", ""))
    assert now > first_tokens
    # the run goes on from its weights: one metrics line per step, steps never restart
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert checkpoint.list_checkpoints(tmp_path / "run"), log.read_text()
    # the end is open, so after warmup the learning rate holds its peak
    assert [r["lr"] for r in records[:3]] == [5e-4, 1e-3, 1e-3] and {r["lr"] for r in records[2:]} == {1e-3}
    # where the file was picked up: at an epoch's end, or at the first multiple of --watch-interval
    lines = log.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if "watch: 1 new or changed file" in line)
    if interval:  # mid-epoch, ending that epoch early; the next one runs over the larger data
        ended = re.search(r"steps 1-(\d+)\), sequences dealt", lines[at + 1])
        assert ended and int(ended[1]) % interval == 0 and int(ended[1]) < per_epoch, lines[at : at + 2]
    else:  # every epoch before it was whole
        ended = re.match(r"Epoch (\d+) complete", lines[at - 1])
        assert ended, lines[at - 1 : at + 1]
        steps_in = [sum(r["epoch"] == e for r in records) for e in range(1, int(ended[1]) + 1)]
        assert steps_in == [per_epoch] * int(ended[1])


@pytest.mark.skipif(not _core.bf16_supported(),
                    reason="this CPU lacks avx512_bf16: bf16 training is tested where the CPU has it")
def test_bf16_training_tracks_fp32_and_saves_float32_weights(tmp_path, cache):
    runs = {p: Trainer(tiny_config(tmp_path / p, max_steps=12, threads=2, learning_rate=1e-2, warmup_steps=2,
                                   precision=p)) for p in ("fp32", "bf16")}
    curves = {p: t.run().losses for p, t in runs.items()}
    assert runs["bf16"].trainer.precision == "bf16" and runs["fp32"].trainer.precision == "fp32"
    assert curves["bf16"] != curves["fp32"], "bf16 must change the rounding"
    assert curves["bf16"][-1] < curves["bf16"][0] - 0.3
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], rtol=2e-2)
    # the checkpoint format is unchanged: float32 master weights, as trained
    saved = checkpoint.load(tmp_path / "bf16")
    for name, w in runs["bf16"].trainer.parameters().items():
        assert saved.params[name].dtype == np.float32 and np.array_equal(saved.params[name], w), name


def test_fp32_is_what_auto_trains_in_when_forced_by_the_environment(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("CRYSTALLINE_FORCE_FP32", "1")
    trainer = Trainer(tiny_config(tmp_path / "forced", max_steps=1, threads=2, precision="auto"))
    trainer.run()
    assert trainer.trainer.precision == "fp32"
