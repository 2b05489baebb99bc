"""Model-size advice: true parameter counts, the recommendation and the
data check, through the API and `crystalline size`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from crystalline.config import ModelConfig
from crystalline.data import sizing
from crystalline.data.stats import size_run
from crystalline.errors import UserError
from crystalline.precision import resolve as resolve_precision

PYTHON_DIR = str(Path(sizing.__file__).resolve().parents[2])


def formula(cfg: ModelConfig) -> int:
    v, c, t, l = cfg.vocab_size, cfg.n_embd, cfg.block_size, cfg.n_layer
    return v * c + t * c + l * (12 * c * c + 13 * c) + 2 * c


def test_table_rows_true_counts_match_the_gpt2_formula_and_the_docstring():
    true_counts = [5_785_088, 18_425_856, 40_711_168, 123_652_608, 304_203_776]
    assert [row.config.num_parameters() for row in sizing.TABLE] == true_counts
    for row, count in zip(sizing.TABLE, true_counts):
        assert formula(row.config) == count
        assert f"{count:,}" in sizing.__doc__


def test_table_row_by_data_size():
    assert sizing.table_row(5 * sizing.MB).config.n_embd == 256
    assert sizing.table_row(10 * sizing.MB).config.n_embd == 384
    assert sizing.table_row(300 * sizing.MB).config.n_embd == 768
    assert sizing.table_row(5_000 * sizing.MB).config.n_embd == 1024


def test_recommend_keeps_the_table_row_when_tokens_suffice():
    cfg = sizing.recommend(num_tokens=10**9, data_bytes=100 * sizing.MB)
    assert cfg == sizing.table_row(100 * sizing.MB).config


def test_recommend_steps_down_until_tokens_per_parameter_holds():
    tokens = 8_000_000  # about the stdlib source at vocab 30K
    cfg = sizing.recommend(tokens, 31 * sizing.MB)
    assert cfg.num_parameters() <= tokens / sizing.MIN_TOKENS_PER_PARAM
    next_up = sizing.LADDER[[r.config for r in sizing.LADDER].index(cfg) + 1].config
    assert next_up.num_parameters() > tokens / sizing.MIN_TOKENS_PER_PARAM
    assert sizing.recommend(1_000, 10_000) == sizing.LADDER[0].config


def test_check_data_refuses_less_than_one_step():
    cfg = sizing.LADDER[0].config
    with pytest.raises(UserError, match="Dataset too small: need 1,025 tokens, have 1,024"):
        sizing.check_data(cfg, 1024, batch_size=4, seq_len=256)
    warnings = sizing.check_data(cfg, 1025, batch_size=4, seq_len=256)
    assert any("tokens per parameter" in w for w in warnings)
    assert any("only 1 step" in w for w in warnings)
    assert sizing.check_data(cfg, 10**8, batch_size=4, seq_len=256) == []


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR, XDG_CACHE_HOME=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", "crystalline", *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("size")
    src = root / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(200)))
    result = run_cli("prepare", "src", "--out", "ds", "--vocab-size", "300", "--no-progress", cwd=root)
    assert result.returncode == 0, result.stderr
    return root


def test_size_reports_parameters_memory_tokens_and_recommendation(dataset):
    result = run_cli("size", "ds", "--embed-dim", "32", "--num-layers", "1", "--num-heads", "2", "--seq-len", "64",
                     "--batch-size", "8", cwd=dataset)
    assert result.returncode == 0, result.stderr
    cfg = ModelConfig(vocab_size=300, n_embd=32, n_layer=1, n_head=2, block_size=64)
    assert f"parameters     {cfg.num_parameters():,}" in result.stdout
    assert "GiB to train at batch 8 x seq 64" in result.stdout
    assert "recommended" in result.stdout and "stated ~10M parameters, true 5,785,088" in result.stdout


# Trainers of these shapes, after one step, hold what `size` counts; the second
# trains at T=2048, where attention that kept [T, T] probabilities would need
# more than twice the estimate.
MEASURED = [dict(vocab_size=300, n_embd=384, n_layer=4, n_head=6, block_size=64, batch_size=24, threads=3),
            dict(vocab_size=300, n_embd=128, n_layer=2, n_head=4, block_size=2048, batch_size=2, threads=3)]
RESIDENT_GROWTH = """
import sys
import numpy as np
from crystalline import _core

def status(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024

s = eval(sys.argv[1])
before = status("VmRSS")
trainer = _core.Trainer(s["vocab_size"], s["n_embd"], s["n_layer"], s["n_head"], s["block_size"], threads=s["threads"])
for _ in range(2):
    trainer.step(np.random.default_rng(0).integers(0, 300, (s["batch_size"], s["block_size"] + 1)), 1e-3)
print(status("VmRSS") - before, status("VmHWM") - before)
"""


@pytest.mark.parametrize("s", MEASURED, ids=["T64", "T2048"])
def test_size_memory_is_what_a_trainer_of_that_shape_holds(dataset, s):
    result = run_cli("size", "ds", "--embed-dim", str(s["n_embd"]), "--num-layers", str(s["n_layer"]),
                     "--num-heads", str(s["n_head"]), "--seq-len", str(s["block_size"]),
                     "--batch-size", str(s["batch_size"]), "--threads", str(s["threads"]), cwd=dataset)
    assert result.returncode == 0, result.stderr
    gib = float(re.search(r"memory +([\d.]+) GiB to train", result.stdout)[1])
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    measured = subprocess.run([sys.executable, "-c", RESIDENT_GROWTH, repr(s)], env=env, capture_output=True, text=True)
    assert measured.returncode == 0, measured.stderr
    held, peak = (int(x) / 2**30 for x in measured.stdout.split())
    assert gib > 0.1 and held == pytest.approx(gib, rel=0.15), (gib, held)
    assert peak < gib * 1.15, (gib, peak)


def test_size_exits_2_when_the_data_cannot_fill_one_step(dataset):
    result = run_cli("size", "ds", "--batch-size", "512", "--seq-len", "1024", cwd=dataset)
    assert result.returncode == 2
    assert result.stderr.startswith("error: Dataset too small: need 524,289 tokens")


def test_size_on_raw_text_and_a_toml_config(dataset):
    # the same TOML `crystalline train --config` takes
    (dataset / "model.toml").write_text("embed-dim = 48\nnum_layers = 2\nnum_heads = 3\nseq_len = 32\nbatch_size = 2\n")
    result = run_cli("size", "src", "--config", "model.toml", "--vocab-size", "300", "--no-progress", cwd=dataset)
    assert result.returncode == 0, result.stderr
    assert "embed 48, layers 2, heads 3, block 32" in result.stdout
    assert "batch 2 x seq 32" in result.stdout
    bad = run_cli("size", "ds", "--embed-dim", "50", "--num-heads", "3", cwd=dataset)
    assert bad.returncode == 2 and "--embed-dim 50 is not divisible by --num-heads 3" in bad.stderr


def test_size_run_sizes_the_recommended_model_or_the_settings_given(dataset):
    ds = dataset / "ds"
    rec = size_run([ds], {}, progress=False)
    assert rec.model == replace(rec.recommended, vocab_size=300) and rec.config.batch_size == 16
    assert rec.train_tokens + rec.val_tokens > 0 and rec.data_bytes == sum(f.stat().st_size for f in (dataset / "src").iterdir())
    assert rec.table_row == sizing.table_row(rec.data_bytes)
    given = size_run([ds], dict(n_embd=32, n_layer=1, n_head=2, seq_len=64, batch_size=8, threads=3))
    assert given.model == ModelConfig(vocab_size=300, n_embd=32, n_layer=1, n_head=2, block_size=64)
    assert given.parameters == given.model.num_parameters()
    precision = resolve_precision(given.config.precision)
    assert given.memory_bytes == given.model.training_memory_bytes(8, 64, 3, precision=precision)
    assert (given.bf16_bytes > 0) == (precision == "bf16")
    assert given.memory_bytes - given.bf16_bytes == given.model.training_memory_bytes(8, 64, 3, precision="fp32")
    with pytest.raises(UserError, match="vocab size 200 is smaller than the tokenizer's 300"):
        size_run([ds], dict(vocab_size=200, n_embd=32, n_layer=1, n_head=2))
