"""Central-difference gradient checking shared by the kernel and model tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

EPS = 1e-2
TOLERANCE = 1e-2


def numerical_grad(loss: Callable[[np.ndarray], float], x: np.ndarray, indices=None) -> np.ndarray:
    """d loss / d x by central differences (at `indices` of the flat array, or all)."""
    flat = x.reshape(-1)
    picks = range(flat.size) if indices is None else indices
    grad = np.zeros(len(picks) if indices is not None else flat.size)
    for k, i in enumerate(picks):
        orig = flat[i]
        flat[i] = orig + EPS
        up = loss(x)
        flat[i] = orig - EPS
        down = loss(x)
        flat[i] = orig
        grad[k] = (up - down) / (2 * EPS)
    return grad


def relative_error(numeric: np.ndarray, analytic: np.ndarray) -> float:
    """|num - ana| / max(|num|, |ana|) over the whole tensor."""
    numeric = np.asarray(numeric, np.float64).reshape(-1)
    analytic = np.asarray(analytic, np.float64).reshape(-1)
    denom = max(np.linalg.norm(numeric), np.linalg.norm(analytic), 1e-12)
    return float(np.linalg.norm(numeric - analytic) / denom)


def assert_grad(name: str, loss: Callable[[np.ndarray], float], x: np.ndarray, analytic: np.ndarray) -> None:
    assert np.abs(analytic).sum() > 0, f"{name}: analytic gradient is all zero"
    err = relative_error(numerical_grad(loss, x), analytic)
    assert err < TOLERANCE, f"{name}: relative error {err:.2e}"
