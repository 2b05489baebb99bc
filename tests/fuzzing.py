"""Fuzzers for `crystalline._core`: hypothesis draws dtypes, ranks, shapes
(zeros, and sizes near 2**32 and 2**63 where another axis is empty), strides,
token ids and scalar arguments for every function and method, and checks
that each call either works or raises TypeError, ValueError or MemoryError.

A crash (a signal, an abort) cannot be caught in-process, so callers run
`main` in a child process: `python tests/fuzzing.py core --examples N`.
`tests/test_fuzz.py` runs a few hundred examples; `benches/fuzz.py` many.
"""

from __future__ import annotations

import argparse
import sys

import hypothesis
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ALLOWED = (TypeError, ValueError, MemoryError)

# Axis lengths: small ones, and huge ones that only appear beside an empty axis
# (numpy can hold a (0, 2**40) array; the core must not multiply them blindly).
SMALL = st.sampled_from([0, 1, 2, 3, 4, 5, 8, 12])
HUGE = st.sampled_from([2**31 - 1, 2**32, 2**32 + 1, 2**40, 2**62, 2**63 - 1])
DTYPES = st.sampled_from([np.float32, np.float32, np.float32, np.float64, np.int64, np.int32, np.uint8,
                          np.uint16, np.int8, np.bool_, np.complex64])
INTS = st.sampled_from([-(2**63), -1, 0, 1, 2, 3, 4, 7, 12, 61, 2**31, 2**32, 2**63 - 1, 2**64, 2**70])
FLOATS = st.sampled_from([0.0, 1e-50, 0.5, 1.0, 2.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30])


@st.composite
def shapes(draw, rank: int | None = None) -> tuple[int, ...]:
    rank = draw(st.integers(0, 4)) if rank is None else rank
    shape = [draw(SMALL) for _ in range(rank)]
    if rank >= 2 and draw(st.booleans()) and draw(st.booleans()):
        # a huge axis next to an empty one: no memory, an enormous product
        i, j = draw(st.permutations(range(rank)))[:2]
        shape[i], shape[j] = 0, draw(HUGE)
    return tuple(shape)


@st.composite
def arrays(draw, rank: int | None = None, dtype=None, ids_below: int | None = None) -> np.ndarray:
    shape = draw(shapes(rank))
    dtype = draw(DTYPES) if dtype is None else dtype
    if int(np.prod([d for d in shape if d] or [1], dtype=object)) * np.dtype(dtype).itemsize >= 2**62:
        shape = tuple(min(d, 2**32) for d in shape)  # numpy itself refuses more
    if draw(st.booleans()) and 0 < int(np.prod(shape, dtype=object)) <= 4096 and len(shape) >= 1:
        # a strided view: every other element of a larger array, or a transpose
        base = np.zeros(tuple(2 * d for d in shape), dtype=dtype)[tuple(slice(None, None, 2) for _ in shape)]
        a = base if draw(st.booleans()) else np.zeros(shape[::-1], dtype=dtype).T
    else:
        a = np.zeros(shape, dtype=dtype)
    if a.size and a.size <= 4096:
        if ids_below is not None and np.issubdtype(a.dtype, np.integer):
            lo = -1 if draw(st.booleans()) else 0
            a[...] = np.random.default_rng(draw(st.integers(0, 99))).integers(lo, max(ids_below, 1) + 1, size=a.shape)
        elif np.issubdtype(a.dtype, np.floating):
            a[...] = np.random.default_rng(draw(st.integers(0, 99))).standard_normal(a.shape)
            if draw(st.booleans()):
                a.flat[0] = draw(FLOATS)
    return a


def anything():
    return st.one_of(arrays(), arrays(dtype=np.float32), INTS, FLOATS, st.none(), st.text(max_size=3),
                     st.lists(INTS, max_size=3))


@st.composite
def dims(draw) -> dict[str, int]:
    """One consistent set of axis lengths for a call's arguments; usually
    small (zeros included), sometimes one huge length beside an empty axis."""
    d = {k: draw(SMALL) for k in ("N", "C", "OC", "B", "T", "V")}
    d["NH"] = draw(st.sampled_from([1, 2, 3, 4]))
    d["C3"], d["C4"] = 3 * d["C"], 4 * d["C"]
    if draw(st.integers(0, 5)) == 0:
        a, b = draw(st.permutations(["N", "C", "OC", "B", "T", "V"]))[:2]
        d[a], d[b] = 0, draw(HUGE)
    return d


def shaped(kind: str, axes: tuple[str, ...] = (), below: str | None = None):
    """An argument built from the call's `dims`: well formed most of the
    time, anything at all otherwise."""
    def build(d):
        shape = tuple(d[a] for a in axes)
        if kind == "f32":
            good = arrays_of(shape, np.float32)
        elif kind == "ids":
            good = arrays_of(shape, np.int64, d[below] if below else 61)
        else:  # an integer argument named by `axes[0]`
            good = st.just(d[axes[0]])
        return st.one_of(good, good, good, anything())
    return build


@st.composite
def arrays_of(draw, shape: tuple[int, ...], dtype, ids_below: int | None = None) -> np.ndarray:
    if int(np.prod([x for x in shape if x] or [1], dtype=object)) * np.dtype(dtype).itemsize >= 2**62:
        shape = tuple(min(x, 2**32) for x in shape)
    n = int(np.prod(shape, dtype=object))
    if n > 2**22:  # a huge axis without an empty one: a read-only view of one value, strides 0
        shape = tuple(min(x, 2**22) for x in shape) if n > 2**26 else shape
        return np.broadcast_to(np.zeros((), dtype), shape)
    a = np.zeros(shape, dtype=dtype)
    if 0 < n <= 4096:
        rng = np.random.default_rng(draw(st.integers(0, 99)))
        if ids_below is not None:
            a[...] = rng.integers(-1 if draw(st.integers(0, 9)) == 0 else 0, max(ids_below, 1), size=shape)
        else:
            a[...] = rng.standard_normal(shape)
        if len(shape) >= 1 and draw(st.booleans()):
            a = np.asfortranarray(a) if len(shape) >= 2 else np.repeat(a, 2)[::2]  # same values, other strides
    return a


def calls(core):
    """name -> (callable, [argument builders]) for every function and method of `core`."""
    m = lambda: core.Model(61, 8, 1, 2, 6)  # noqa: E731 - a fresh tiny model per call
    tr = lambda: core.Trainer(61, 8, 1, 2, 6, threads=3)  # noqa: E731

    def decode(seqs, tokens, want):
        model = m()
        model.reset_cache(2)
        return model.decode(seqs, tokens, want)

    f, i, n = (lambda *a: shaped("f32", a)), (lambda a, below=None: shaped("ids", a, below)), (lambda a: shaped("int", (a,)))
    any_ = lambda strategy: lambda d: strategy  # noqa: E731 - a builder that ignores the dims
    return {
        "matmul_forward": (core.matmul_forward, [f("N", "C"), f("C", "OC"), f("OC")]),
        "matmul_backward": (core.matmul_backward, [f("N", "OC"), f("N", "C"), f("C", "OC")]),
        "layernorm_forward": (core.layernorm_forward, [f("N", "C"), f("C"), f("C")]),
        "layernorm_backward": (core.layernorm_backward, [f("N", "C"), f("N", "C"), f("C"), f("N"), f("N")]),
        "gelu_forward": (core.gelu_forward, [f("N", "C")]),
        "gelu_backward": (core.gelu_backward, [f("N", "C"), f("N", "C")]),
        "residual_forward": (core.residual_forward, [f("N", "C"), f("N", "C")]),
        "residual_backward": (core.residual_backward, [f("B", "T", "C")]),
        "encoder_forward": (core.encoder_forward, [i(("B", "T"), "V"), f("V", "C"), f("T", "C")]),
        "encoder_backward": (core.encoder_backward, [f("B", "T", "C"), i(("B", "T"), "V"), n("V"), n("T")]),
        "attention_forward": (core.attention_forward, [f("B", "T", "C3"), n("NH")]),
        "attention_backward": (core.attention_backward, [f("B", "T", "C"), f("B", "T", "C3"), f("B", "NH", "T", "T"), n("NH")]),
        "crossentropy_forward": (core.crossentropy_forward, [f("N", "V"), i(("N",), "V")]),
        "crossentropy_backward": (core.crossentropy_backward, [f("N", "V"), i(("N",), "V"), f("N")]),
        "softmax_crossentropy": (core.softmax_crossentropy, [f("N", "V"), i(("N",), "V")]),
        "adamw_update": (core.adamw_update, [f("N", "C"), f("N", "C"), f("N", "C"), f("N", "C"), any_(INTS),
                                             any_(FLOATS), any_(FLOATS), any_(FLOATS)]),
        "parameter_shapes": (core.parameter_shapes, [any_(INTS)] * 5),
        "validate_model": (core.validate_model, [any_(INTS)] * 5),
        "validate_optimizer": (core.validate_optimizer, [any_(FLOATS)] * 5),
        "validate_sampling": (core.validate_sampling, [any_(FLOATS), any_(INTS), any_(FLOATS)]),
        "lanes": (core.lanes, [any_(INTS)]),
        "training_memory_bytes": (
            lambda *a: core.training_memory_bytes(*a[:5], batch_size=a[5], seq_len=a[6], threads=a[7]), [any_(INTS)] * 8),
        "Model": (core.Model, [any_(INTS)] * 6),
        "Model.forward": (lambda x: m().forward(x), [i(("B", "T"))]),
        "Model.loss": (lambda x, y: m().loss(x, y), [i(("B", "T")), i(("B", "T"))]),
        "Model.loss_and_grad": (lambda x, y: m().loss_and_grad(x, y), [i(("B", "T")), i(("B", "T"))]),
        "Model.set_threads": (lambda k: m().set_threads(k), [any_(INTS)]),
        "Model.reset_cache": (lambda b, s: m().reset_cache(b, s), [n("B"), any_(INTS)]),
        "Model.clear_sequence": (lambda s: m().clear_sequence(s), [any_(INTS)]),
        "Model.decode": (decode, [any_(st.lists(st.sampled_from([0, 1, 2, -1, 2**64]), max_size=5)), i(("N",)),
                                  any_(st.booleans())]),
        "Model.sample": (lambda x, t, k, p: m().sample(x, t, k, p), [f("N", "V"), any_(FLOATS), any_(INTS), any_(FLOATS)]),
        "Trainer": (lambda *a: core.Trainer(*a[:5], threads=a[5], seed=a[6], grad_clip=a[7]),
                    [any_(INTS)] * 7 + [any_(FLOATS)]),
        "Trainer.step": (lambda x, lr: tr().step(x, lr), [i(("B", "T")), any_(FLOATS)]),
        "Trainer.eval": (lambda x: tr().eval(x), [i(("B", "T"))]),
        "Trainer.set": (lambda s, k: setattr(tr(), "step_count", s) or setattr(tr(), "dealt", k), [any_(INTS)] * 2),
    }


@st.composite
def call_cases(draw, funcs) -> tuple[str, tuple]:
    name = draw(st.sampled_from(sorted(funcs)))
    d = draw(dims())
    return name, tuple(draw(build(d)) for build in funcs[name][1])


def fuzz_core(examples: int, seed: int) -> None:
    """Call `_core` with `examples` drawn argument lists; raise on any
    exception other than TypeError, ValueError or MemoryError."""
    from crystalline import _core

    funcs = calls(_core)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(call_cases(funcs))
    def run(case):
        name, args = case
        print(f"{name}{tuple(_short(a) for a in args)}", file=sys.stderr, flush=True)
        try:
            funcs[name][0](*args)
        except ALLOWED:
            pass

    hypothesis.seed(seed)(run)()


def _short(a) -> str:
    if isinstance(a, np.ndarray):
        return f"array({a.dtype}, {a.shape}, strides={a.strides})"
    return repr(a)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=["core"])
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    fuzz_core(args.examples, args.seed)
    print(f"fuzzed {args.target}: {args.examples} examples, no crash", flush=True)


if __name__ == "__main__":
    main()
