"""The whole GPT-2 model through `crystalline._core.Model`: gradients against
finite differences, the loss at initialisation, memorisation with AdamW,
causality, zero-copy parameter views and refusal of bad input."""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import numpy as np
import pytest

from crystalline import Model, ModelConfig, _core
from gradcheck import numerical_grad, relative_error

TINY = dict(vocab_size=61, n_embd=16, n_layer=2, n_head=2, block_size=9)


def tiny_batch(b: int = 2, t: int = 9, v: int = 61, seed: int = 0):
    ids = np.random.default_rng(seed).integers(0, v, size=(b, t + 1))
    return ids[:, :-1].copy(), ids[:, 1:].copy()


def test_gradients_match_finite_differences_for_every_parameter_tensor():
    model = Model(**TINY, seed=3)
    params = model.parameters()
    rng = np.random.default_rng(1)
    for p in params.values():  # move off the init so every path carries signal
        p += (0.05 * rng.standard_normal(p.shape)).astype(np.float32)
    x, y = tiny_batch()
    _, grads = model.loss_and_grad(x, y)
    grads = {k: v.copy() for k, v in grads.items()}
    for name, p in params.items():
        picks = rng.choice(p.size, size=min(p.size, 24), replace=False)
        numeric = numerical_grad(lambda _: model.loss(x, y), p, picks)
        err = relative_error(numeric, grads[name].reshape(-1)[picks])
        assert err < 1e-2, f"{name}: relative error {err:.2e}"


def test_initial_loss_is_log_vocab():
    model = Model(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, block_size=32, seed=0)
    x, y = tiny_batch(4, 32, 1000)
    assert abs(model.loss(x, y) - math.log(1000)) < 0.1


def test_loss_is_computed_from_the_models_logits():
    """The bug this project exists to avoid: a loss that ignores the predictions."""
    model = Model(**TINY, seed=0)
    x, y = tiny_batch(1, 9)
    logits = model.forward(x).reshape(9, -1)
    mean, _ = _core.softmax_crossentropy(np.ascontiguousarray(logits), y.reshape(-1))
    assert model.loss(x, y) == pytest.approx(mean, rel=1e-5)
    # change only the predictions (the final LayerNorm's bias): the loss follows them
    model.parameters()["ln_f.bias"][:] = np.random.default_rng(2).standard_normal(16).astype(np.float32)
    new_logits = np.ascontiguousarray(model.forward(x).reshape(9, -1))
    new_mean, _ = _core.softmax_crossentropy(new_logits, y.reshape(-1))
    assert model.loss(x, y) == pytest.approx(new_mean, rel=1e-5)
    assert new_mean != pytest.approx(mean, rel=1e-3)
    assert model.loss(x, x) != model.loss(x, y)


def test_adamw_memorises_a_64_token_sequence():
    model = Model(vocab_size=40, n_embd=32, n_layer=2, n_head=2, block_size=64, seed=0)
    seq = np.random.default_rng(5).integers(0, 40, size=65)
    x, y = seq[None, :64].copy(), seq[None, 1:].copy()
    params = model.parameters()
    state = {k: (np.zeros_like(p), np.zeros_like(p)) for k, p in params.items()}
    loss = float("inf")
    for step in range(1, 301):
        loss, grads = model.loss_and_grad(x, y)
        for name, p in params.items():
            m, v = state[name]
            _core.adamw_update(p, grads[name], m, v, step, 1e-2, weight_decay=0.0)
    assert model.loss(x, y) < 0.05, f"final loss {loss}"


def test_attention_is_causal():
    model = Model(**TINY, seed=4)
    x, _ = tiny_batch(1, 9)
    before = model.forward(x)
    x2 = x.copy()
    x2[0, 5] = (x2[0, 5] + 7) % 61
    after = model.forward(x2)
    np.testing.assert_array_equal(before[0, :5], after[0, :5])
    assert not np.allclose(before[0, 5:], after[0, 5:])


def test_parameters_are_zero_copy_views_of_the_rust_buffer():
    model = Model(**TINY, seed=0)
    p = model.parameters()
    names = [n for n, _ in ModelConfig(**TINY).parameter_shapes()]
    assert list(p) == names
    assert sum(v.size for v in p.values()) == model.num_parameters() == ModelConfig(**TINY).num_parameters()
    assert p["h.1.mlp.c_fc.weight"].shape == (16, 64)
    x, y = tiny_batch()
    before = model.loss(x, y)
    p["wte.weight"][:] = 0.0  # writes through to the model
    assert model.loss(x, y) != before
    assert np.all(model.parameters()["wte.weight"] == 0.0)


def test_init_follows_gpt2():
    model = Model(vocab_size=500, n_embd=64, n_layer=4, n_head=4, block_size=64, seed=0)
    p = model.parameters()
    assert abs(p["wte.weight"].std() - 0.02) < 0.002
    assert abs(p["h.0.attn.c_proj.weight"].std() - 0.02 / math.sqrt(8)) < 0.001
    assert np.all(p["h.0.ln_1.weight"] == 1) and np.all(p["h.0.attn.c_attn.bias"] == 0)
    assert np.array_equal(Model(**TINY, seed=9).parameters()["wte.weight"], Model(**TINY, seed=9).parameters()["wte.weight"])


def test_bad_model_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible"):
        Model(vocab_size=10, n_embd=16, n_layer=1, n_head=3, block_size=4)
    model = Model(**TINY)
    x, y = tiny_batch()
    with pytest.raises(ValueError, match="out of range for vocab_size 61"):
        model.forward(x + 61)
    with pytest.raises(ValueError, match="exceeds the model's block_size 9"):
        model.forward(np.zeros((1, 10), np.int64))
    with pytest.raises(ValueError, match=r"targets has shape \[2, 8\], expected \[2, 9\]"):
        model.loss(x, y[:, :8].copy())
    with pytest.raises(TypeError, match="tokens must be an integer"):
        model.forward(x.astype(np.float32))
    with pytest.raises(ValueError, match="tokens must have 2 dimensions"):
        model.forward(x[0])
    with pytest.raises(ValueError, match="n_embd 16 is not divisible by n_head 3"):
        ModelConfig(61, 16, 2, 3, 9).num_parameters()


def test_sliced_batches_need_no_copy_by_the_caller():
    model = Model(**TINY, seed=2)
    ids = np.random.default_rng(5).integers(0, 61, size=(3, 10))
    loss, grads = model.loss_and_grad(ids[:, :-1], ids[:, 1:])
    grads = {k: v.copy() for k, v in grads.items()}
    x, y = np.ascontiguousarray(ids[:, :-1]), np.ascontiguousarray(ids[:, 1:])
    loss2, grads2 = model.loss_and_grad(x, y)
    assert loss == loss2
    assert all(np.array_equal(grads[k], grads2[k]) for k in grads)
    assert model.loss(ids[:, :-1], ids[:, 1:]) == model.loss(x, y)
    np.testing.assert_array_equal(model.forward(ids[::2, :-1]), model.forward(np.ascontiguousarray(ids[::2, :-1])))


def stub_signatures() -> dict[str, inspect.Signature]:
    """The signatures `_core.pyi` declares, by name ("Model.sample"), with the
    defaults as written there."""
    tree = ast.parse(Path(_core.__file__).with_name("_core.pyi").read_text())
    found = {}

    def visit(body, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{node.name}.")
            elif isinstance(node, ast.FunctionDef):
                a = node.args
                params = []
                positional = a.posonlyargs + a.args
                pos_defaults = [None] * (len(positional) - len(a.defaults)) + a.defaults
                for arg, d in zip(positional, pos_defaults):
                    default = inspect.Parameter.empty if d is None else ast.literal_eval(d)
                    params.append(inspect.Parameter(arg.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
                for arg, d in zip(a.kwonlyargs, a.kw_defaults):
                    default = inspect.Parameter.empty if d is None else ast.literal_eval(d)
                    params.append(inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY, default=default))
                found[prefix + node.name] = inspect.Signature(params)

    visit(tree.body, "")
    return found


def test_the_stub_declares_every_binding_with_its_runtime_signature():
    # the parameters' names, kinds and defaults as Python sees them (help(),
    # inspect) match the .pyi that type checkers and editors read
    checked = 0
    for name, stub in stub_signatures().items():
        owner, _, attr = name.rpartition(".")
        obj = getattr(getattr(_core, owner), attr) if owner else getattr(_core, attr)
        if attr == "__init__":
            obj = getattr(_core, owner)
        runtime = inspect.signature(obj)
        params = [p for p in stub.parameters.values() if p.name != "self"]
        want = [(p.name, p.kind, p.default) for p in params]
        got = [(p.name, p.kind, p.default) for p in runtime.parameters.values() if p.name != "self"]
        assert got == want, f"{name}: runtime {runtime} vs stub {stub}"
        checked += 1
    assert checked == len(stub_signatures()) >= 50
