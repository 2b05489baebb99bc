"""`crystalline train` end to end: determinism, resume, Ctrl-C, kill -9 during
a save, the symmetry-group distribution, every sphere working, the loss
falling on real text, and each refusal. Tiny models keep it quick."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from crystalline import checkpoint
from crystalline.errors import UserError
from crystalline.plot import read_metrics
from crystalline.config import ModelConfig, TrainConfig, build_config
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


def test_sigint_saves_exits_130_and_resume_continues_bit_identically(tmp_path, env):
    args = ["train", str(STDLIB / "json"), *TINY, "--epochs", "5", "--threads", "3", "--save-interval", "1000"]
    full = cli([*args, "--checkpoint-dir", str(tmp_path / "full")], env)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "crystalline", *args, "--checkpoint-dir", str(run)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: saved" in err
    cut_at = len(losses(run))
    assert 20 <= cut_at < 460
    assert checkpoint.list_checkpoints(run)[-1].name == f"ckpt-{cut_at:08d}"
    resumed = cli(["train", "--resume", str(run), "--no-progress", "--sample-tokens", "0"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(tmp_path / "full")


def test_kill_9_during_saves_never_leaves_a_bad_checkpoint(tmp_path, env):
    run = tmp_path / "run"
    args = [str(STDLIB / "json"), *TINY, "--epochs", "30", "--threads", "2", "--save-interval", "1",
            "--keep", "2", "--checkpoint-dir", str(run)]
    for delay in (1.5, 2.2, 2.9):
        if checkpoint.list_checkpoints(run):
            args_now = ["train", "--resume", str(run), "--no-progress", "--sample-tokens", "0"]
        else:
            args_now = ["train", *args]
        proc = subprocess.Popen([sys.executable, "-m", "crystalline", *args_now], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        found = checkpoint.list_checkpoints(run)
        assert found, "no checkpoint survived"
        for ck in found:  # every complete checkpoint directory verifies and loads
            loaded = checkpoint.load(ck)
            assert loaded.state.step == int(ck.name.split("-")[1])


def sphere_lines(stderr: str) -> dict[int, int]:
    return {int(m[1]): int(m[2]) for m in re.finditer(r"\[Sphere (\d+)\] (\d+) batches, busy", stderr)}


def test_skewed_corpus_is_dealt_evenly_and_all_eleven_spheres_work(tmp_path, env):
    # every document the same few characters: the token ids sit in one or two groups
    data = tmp_path / "skewed"
    data.mkdir()
    for i in range(40):
        (data / f"f{i}.txt").write_text("aaaa " * 300)
    r = cli(["train", str(data), "--vocab-size", "260", "--embed-dim", "16", "--num-layers", "1",
             "--num-heads", "2", "--batch-size", "12", "--seq-len", "16", "--max-steps", "20", "--threads", "12",
             "--no-progress", "--sample-tokens", "0", "--verbose", "--checkpoint-dir", str(tmp_path / "run")], env)
    assert r.returncode == 0, r.stderr
    shares = [int(m) for m in re.findall(r"Group +\d+: (\d+) batches", r.stderr)]
    assert len(shares) == 12 and max(shares) - min(shares) <= 1 and sum(shares) == 240
    spheres = sphere_lines(r.stderr)
    assert sorted(spheres) == list(range(1, 12))
    assert all(n > 0 for n in spheres.values()), spheres
    assert "Epoch 1/1 complete, average loss:" in r.stderr
    # --verbose: a line per sphere per step
    assert len(re.findall(r"\[Sphere \d+\] Forward pass complete, loss=\d+\.\d{4}", r.stderr)) == 20 * 11


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


def test_learning_rate_warms_up_then_decays_by_cosine():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_python_api_trains_and_reports(tmp_path, monkeypatch, env):
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    cfg = TrainConfig(data=[str(STDLIB / "json")], extensions=[".py"], vocab_size=300, n_embd=32, n_layer=1,
                      n_head=2, batch_size=8, seq_len=32, max_steps=5, threads=1, progress=False,
                      sample_tokens=5, checkpoint_dir=str(tmp_path / "api"))
    run = Trainer(cfg).run()
    assert run.steps == 5 and len(run.losses) == 5 and run.last_checkpoint is not None
    assert isinstance(run.sample, str)


def test_plot_draws_the_loss_curves(tmp_path, env):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    ok = cli(["train", str(STDLIB / "json"), *TINY, "--max-steps", "6", "--eval-interval", "3",
              "--checkpoint-dir", str(run)], env)
    assert ok.returncode == 0, ok.stderr
    curves = read_metrics(run)
    assert curves.steps == list(range(1, 7)) and curves.val_steps == [3, 6] and len(curves.val_losses) == 2
    r = cli(["plot", str(run)], env)
    assert r.returncode == 0, r.stderr
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    missing = cli(["plot", str(tmp_path)], env)
    assert missing.returncode == 2 and "has no metrics.jsonl" in missing.stderr


def wait_for(path: Path, pattern: str, timeout: float = 90) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never appeared in {path}:\n{text}")


def test_watch_waits_for_data_then_picks_up_a_file_added_while_it_runs(tmp_path, env):
    watched = tmp_path / "incoming"
    watched.mkdir()
    log = tmp_path / "log.txt"
    args = ["train", "--watch", str(watched), "--watch-interval", "2", "--vocab-size", "300", "--embed-dim", "32",
            "--num-layers", "1", "--num-heads", "2", "--batch-size", "4", "--seq-len", "32", "--val-fraction", "0",
            "--no-progress", "--sample-tokens", "0", "--checkpoint-dir", str(tmp_path / "run")]
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "crystalline", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
        try:
            wait_for(log, r"waiting for data in")
            (watched / "first.txt").write_text((STDLIB / "json" / "decoder.py").read_text())
            before = wait_for(log, r"Distribution by symmetry group")
            first_tokens = int(re.search(r"data: ([\d,]+) training tokens", before)[1].replace(",", ""))
            (watched / "second.txt").write_text((STDLIB / "json" / "encoder.py").read_text())
            text = wait_for(log, r"watch: 1 new or changed file\(s\); now ([\d,]+) training tokens")
            now = int(re.search(r"watch: 1 new or changed file\(s\); now ([\d,]+)", text)[1].replace(",", ""))
            assert now > first_tokens
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    assert proc.returncode == 130, log.read_text()
    # the run goes on from its weights: one metrics line per step, steps never restart
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    assert checkpoint.list_checkpoints(tmp_path / "run")
