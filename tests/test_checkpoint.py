"""The checkpoint schema: `State` and the tensors survive a save and load
unchanged, `restore_into` fills a Trainer or a Model and refuses one whose
tensors differ, and state.json written with older names still reads."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from crystalline import _core, checkpoint
from crystalline.config import ModelConfig, TrainConfig
from crystalline.errors import UserError

SHAPE = ModelConfig(vocab_size=50, n_embd=16, n_layer=1, n_head=2, block_size=8)


def trained(seed: int = 0) -> _core.Trainer:
    """A tiny trainer two steps in, so weights and moments are not at their start."""
    trainer = _core.Trainer(**asdict(SHAPE), threads=1, seed=seed)
    batch = np.random.default_rng(seed).integers(0, SHAPE.vocab_size, size=(4, SHAPE.block_size + 1))
    for _ in range(2):
        trainer.step(batch, 1e-2)
    return trainer


def state(step: int = 2) -> checkpoint.State:
    return checkpoint.State(config=TrainConfig(n_embd=16, n_layer=1, n_head=2, seq_len=8), model=SHAPE, step=step,
                            epoch=1, epoch_step=1, optimizer_step=step, dealt=12, tokenizer_hash="abc",
                            train_loss=3.5, val_loss=None)


def save(trainer: _core.Trainer, tmp_path, st: checkpoint.State | None = None):
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    m, v = trainer.optimizer_state()
    return checkpoint.save(tmp_path / "run", trainer.parameters(), m, v, st or state(), tok, keep=2)


def test_state_and_tensors_round_trip_into_a_fresh_trainer(tmp_path):
    source = trained()
    path = save(source, tmp_path)
    ck = checkpoint.load(path)
    assert replace(ck.state, files={}) == state()
    assert set(ck.state.files) == {checkpoint.MODEL, checkpoint.OPTIMIZER, checkpoint.TOKENIZER}
    target = _core.Trainer(**asdict(SHAPE), threads=1, seed=7)
    checkpoint.restore_into(ck, target)
    assert target.step_count == 2
    (m0, v0), (m1, v1) = source.optimizer_state(), target.optimizer_state()
    for ours, theirs in ((source.parameters(), target.parameters()), (m0, m1), (v0, v1)):
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert np.array_equal(ours[name], theirs[name]), name
    model = _core.Model(**asdict(SHAPE))
    checkpoint.restore_into(checkpoint.load(path, with_optimizer=False), model)
    batch = np.random.default_rng(1).integers(0, SHAPE.vocab_size, size=(2, SHAPE.block_size + 1))
    assert model.loss(batch[:, :-1], batch[:, 1:]) == pytest.approx(target.eval(batch), rel=1e-5)


def test_restore_into_refuses_other_names_or_shapes(tmp_path):
    ck = checkpoint.load(save(trained(), tmp_path))
    wider = _core.Model(**{**asdict(SHAPE), "n_embd": 32})
    with pytest.raises(UserError, match="does not match the model \\(tensor wte.weight\\)"):
        checkpoint.restore_into(ck, wider)
    deeper = _core.Model(**{**asdict(SHAPE), "n_layer": 2})
    with pytest.raises(UserError, match="does not match the model \\(tensor h.1"):
        checkpoint.restore_into(ck, deeper)
    ck.params["h.9.mlp.c_fc.weight"] = ck.params["h.0.mlp.c_fc.weight"]
    with pytest.raises(UserError, match="it has tensor h.9.mlp.c_fc.weight"):
        checkpoint.restore_into(ck, _core.Model(**asdict(SHAPE)))


def test_state_json_with_older_config_names_reads(tmp_path):
    path = save(trained(), tmp_path)
    data = json.loads((path / checkpoint.STATE).read_text())
    config = data["config"]
    for old, new in (("embed_dim", "n_embd"), ("num_layers", "n_layer"), ("num_heads", "n_head")):
        config[old] = config.pop(new)
    (path / checkpoint.STATE).write_text(json.dumps(data))
    assert checkpoint.read_state(path).config == state().config
    data["model"]["n_head"] = 3
    (path / checkpoint.STATE).write_text(json.dumps(data))
    with pytest.raises(UserError, match="has no valid model config"):
        checkpoint.read_state(path)
