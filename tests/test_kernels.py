"""Each kernel of `crystalline._core` against finite differences and a numpy
reference, and each kernel's refusal of bad input."""

from __future__ import annotations

import numpy as np
import pytest

from crystalline import _core
from gradcheck import assert_grad

rng = np.random.default_rng(0)


def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def weighted(out: np.ndarray, w: np.ndarray) -> float:
    return float(np.sum(out.astype(np.float64) * w))


def test_matmul_matches_numpy_and_finite_differences():
    x, w, b = rand(6, 5), rand(5, 7), rand(7)
    np.testing.assert_allclose(_core.matmul_forward(x, w, b), x @ w + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_core.matmul_forward(x, w), x @ w, rtol=1e-5, atol=1e-5)
    g = rand(6, 7)
    dx, dw, db = _core.matmul_backward(g, x, w)
    assert_grad("inp", lambda a: weighted(_core.matmul_forward(a, w, b), g), x, dx)
    assert_grad("weight", lambda a: weighted(_core.matmul_forward(x, a, b), g), w, dw)
    assert_grad("bias", lambda a: weighted(_core.matmul_forward(x, w, a), g), b, db)


def test_layernorm_gradients():
    x, w, b = rand(4, 8, scale=2.0), rand(8), rand(8)
    out, mean, rstd = _core.layernorm_forward(x, w, b)
    ref = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    g = rand(4, 8)
    dx, dw, db = _core.layernorm_backward(g, x, w, mean, rstd)
    assert_grad("inp", lambda a: weighted(_core.layernorm_forward(a, w, b)[0], g), x, dx)
    assert_grad("weight", lambda a: weighted(_core.layernorm_forward(x, a, b)[0], g), w, dw)
    assert_grad("bias", lambda a: weighted(_core.layernorm_forward(x, w, a)[0], g), b, db)


def test_gelu_gradient_and_values():
    x = rand(3, 11, scale=2.0)
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(_core.gelu_forward(x), ref, rtol=1e-5, atol=1e-6)
    g = rand(3, 11)
    assert_grad("inp", lambda a: weighted(_core.gelu_forward(a), g), x, _core.gelu_backward(g, x))


def test_residual_gradients():
    a, b, g = rand(10), rand(10), rand(10)
    np.testing.assert_array_equal(_core.residual_forward(a, b), a + b)
    da, db = _core.residual_backward(g)
    assert_grad("a", lambda x: weighted(_core.residual_forward(x, b), g), a, da)
    assert_grad("b", lambda x: weighted(_core.residual_forward(a, x), g), b, db)


def test_encoder_gradients():
    tokens = np.array([[0, 4, 4], [1, 2, 0]], dtype=np.int64)
    wte, wpe = rand(5, 4), rand(3, 4)
    out = _core.encoder_forward(tokens, wte, wpe)
    np.testing.assert_allclose(out, wte[tokens] + wpe[None, :3], rtol=1e-6)
    g = rand(2, 3, 4)
    dwte, dwpe = _core.encoder_backward(g, tokens, 5, 3)
    assert_grad("wte", lambda a: weighted(_core.encoder_forward(tokens, a, wpe), g), wte, dwte)
    assert_grad("wpe", lambda a: weighted(_core.encoder_forward(tokens, wte, a), g), wpe, dwpe)


def reference_attention(qkv: np.ndarray, nh: int) -> np.ndarray:
    b, t, c3 = qkv.shape
    c = c3 // 3
    hs = c // nh
    q, k, v = (qkv[..., i * c : (i + 1) * c].reshape(b, t, nh, hs).transpose(0, 2, 1, 3) for i in range(3))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    att = np.exp(scores - scores.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    return (att @ v).transpose(0, 2, 1, 3).reshape(b, t, c)


def reference_lse(qkv: np.ndarray, nh: int) -> np.ndarray:
    b, t, c3 = qkv.shape
    c = c3 // 3
    hs = c // nh
    q, k = (qkv[..., i * c : (i + 1) * c].astype(np.float64).reshape(b, t, nh, hs).transpose(0, 2, 1, 3) for i in range(2))
    scores = np.where(np.tril(np.ones((t, t), bool)), q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs), -np.inf)
    top = scores.max(-1, keepdims=True)
    return (top + np.log(np.exp(scores - top).sum(-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("b, t, c, nh", [(2, 5, 8, 2), (1, 1, 4, 1), (1, 70, 6, 1), (2, 259, 12, 3)])
def test_attention_matches_reference_and_gradients(b, t, c, nh):
    # T=1, NH=1, and lengths below and past the kernel's 128-row blocks
    qkv = rand(b, t, 3 * c, scale=2.0)
    out, lse = _core.attention_forward(qkv, nh)
    np.testing.assert_allclose(out, reference_attention(qkv, nh), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse, reference_lse(qkv, nh), rtol=1e-5, atol=1e-5)
    g = rand(b, t, c)
    dqkv = _core.attention_backward(g, qkv, out, lse, nh)
    if t * c <= 64:
        assert_grad("qkv", lambda a: weighted(_core.attention_forward(a, nh)[0], g), qkv, dqkv)
    else:  # past the size central differences check quickly: PyTorch's autograd
        torch = pytest.importorskip("torch")
        x = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
        q, k, v = (z.view(b, t, nh, c // nh).transpose(1, 2) for z in x.split(c, dim=2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        (y * torch.tensor(g, dtype=torch.float64)).sum().backward()
        np.testing.assert_allclose(dqkv, x.grad.numpy(), rtol=1e-3, atol=1e-5)


def test_crossentropy_forward_backward_and_fused():
    logits, targets = rand(4, 9, scale=3.0), np.array([3, 0, 8, 3])
    shifted = logits - logits.max(1, keepdims=True)
    ref = np.log(np.exp(shifted).sum(1)) - shifted[np.arange(4), targets]
    losses = _core.crossentropy_forward(logits, targets)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    dl = np.full(4, 0.25, np.float32)
    dlogits = _core.crossentropy_backward(logits, targets, dl)
    assert_grad("logits", lambda a: float(_core.crossentropy_forward(a, targets).sum()) * 0.25, logits, dlogits)
    mean, fused = _core.softmax_crossentropy(logits, targets)
    assert mean == pytest.approx(ref.mean(), rel=1e-5)
    np.testing.assert_allclose(fused, dlogits, rtol=1e-5, atol=1e-7)


def test_adamw_matches_the_formula():
    p, g = rand(6), rand(6)
    m, v = np.zeros(6, np.float32), np.zeros(6, np.float32)
    expected = p.copy()
    em, ev = 0.0, 0.0
    for step in (1, 2):
        em = 0.9 * em + 0.1 * g
        ev = 0.95 * ev + 0.05 * g * g
        mhat, vhat = em / (1 - 0.9**step), ev / (1 - 0.95**step)
        expected = expected - 0.01 * (mhat / (np.sqrt(vhat) + 1e-8) + 0.1 * expected)
        _core.adamw_update(p, g, m, v, step, 0.01, weight_decay=0.1)
    np.testing.assert_allclose(p, expected, rtol=1e-5)


# --- bad input: one clear exception naming the argument ---------------------


def test_wrong_dtype_is_a_type_error_naming_the_argument():
    with pytest.raises(TypeError, match=r"weight must be a float32.*float64"):
        _core.matmul_forward(rand(2, 3), np.ones((3, 4)))
    with pytest.raises(TypeError, match="targets must be an integer"):
        _core.crossentropy_forward(rand(2, 3), np.array([0.5, 1.0]))


def test_wrong_rank_and_mismatched_shapes_are_value_errors():
    with pytest.raises(ValueError, match=r"inp must have 2 dimensions, got shape \[6\]"):
        _core.matmul_forward(rand(6), rand(6, 2))
    with pytest.raises(ValueError, match=r"weight has shape \[4, 2\], expected \[3, 2\]"):
        _core.matmul_forward(rand(5, 3), rand(4, 2))
    with pytest.raises(ValueError, match="qkv has shape"):
        _core.attention_forward(rand(1, 4, 10), 2)
    with pytest.raises(ValueError, match=r"dout has shape"):
        _core.gelu_backward(rand(3), rand(4))


def test_strided_inputs_are_read_as_numpy_sees_them():
    a, w = rand(3, 5), rand(6, 2)[::2]  # a.T and every other row: neither is C-contiguous
    np.testing.assert_allclose(_core.matmul_forward(a.T, w), a.T @ w, rtol=1e-5, atol=1e-6)
    logits = rand(4, 7)[:, ::-1]
    losses = _core.crossentropy_forward(logits, np.array([0, 1, 2, 3])[::-1].copy())
    np.testing.assert_allclose(losses, _core.crossentropy_forward(np.ascontiguousarray(logits), np.array([3, 2, 1, 0])))


def test_in_place_updates_still_need_a_contiguous_buffer():
    p, g = rand(4, 4).T, rand(4, 4)
    with pytest.raises(ValueError, match="params is updated in place, so it must be C-contiguous"):
        _core.adamw_update(p, g, np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), 1, 0.1)


def test_out_of_range_and_negative_token_ids_are_refused():
    with pytest.raises(ValueError, match=r"tokens\[1, 0\] = 9 is out of range for vocab_size 5"):
        _core.encoder_forward(np.array([[0, 1], [9, 2]]), rand(5, 4), rand(2, 4))
    with pytest.raises(ValueError, match="= -1 is out of range"):
        _core.crossentropy_forward(rand(2, 3), np.array([0, -1]))


def test_adamw_refuses_a_read_only_or_aliased_buffer():
    p = rand(4)
    p.setflags(write=False)
    z = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="params cannot be written"):
        _core.adamw_update(p, rand(4), z, z.copy(), 1, 0.1)
    q = rand(4)
    with pytest.raises(ValueError, match="distinct"):
        _core.adamw_update(q, rand(4), z, z, 1, 0.1)
    with pytest.raises(ValueError, match="step counts from 1"):
        _core.adamw_update(q, rand(4), z, z.copy(), 0, 0.1)
