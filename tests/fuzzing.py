"""Fuzzers, each run in a child process.

`core`: hypothesis draws dtypes, ranks, shapes (zeros, and sizes near 2**32
and 2**63 where another axis is empty), strides, token ids and scalar
arguments for every function and method of `crystalline._core`, and checks
that each call either works or raises TypeError, ValueError or MemoryError.

`cli`: hypothesis draws a command line for every command of the typer app,
with any subset of its options (taken from the app itself, so new ones are
fuzzed too) set to negative, zero, huge, nan, inf, empty, unicode or junk
values, and paths into a sandbox (a tiny corpus, a tiny trained run, its
Hugging Face export, settings files) or at /dev/zero and /dev/null/x. Each
example runs `crystalline.cli.main` in-process on a fresh copy of the
sandbox and must end in exit code 0, 1, 2 or 130 (3 only for a diverging
loss) without a traceback; an example still running after `--limit-s`
seconds is stopped and counted as having run legitimately.

A crash (a signal, an abort) cannot be caught in-process, so callers run
`main` in a child process: `python tests/fuzzing.py core|cli --examples N`.
`tests/test_fuzz.py` runs a few hundred examples; `benches/fuzz.py` many.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import io
import os
import re
import shutil
import signal
import sys
import tempfile
import traceback
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import hypothesis
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
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
        "attention_backward": (core.attention_backward,
                               [f("B", "T", "C"), f("B", "T", "C3"), f("B", "T", "C"), f("B", "NH", "T"), n("NH")]),
        "crossentropy_forward": (core.crossentropy_forward, [f("N", "V"), i(("N",), "V")]),
        "crossentropy_backward": (core.crossentropy_backward, [f("N", "V"), i(("N",), "V"), f("N")]),
        "softmax_crossentropy": (core.softmax_crossentropy, [f("N", "V"), i(("N",), "V")]),
        "adamw_update": (core.adamw_update, [f("N", "C"), f("N", "C"), f("N", "C"), f("N", "C"), any_(INTS),
                                             any_(FLOATS), any_(FLOATS), any_(FLOATS)]),
        "parameter_shapes": (core.parameter_shapes, [any_(INTS)] * 5),
        "validate_model": (core.validate_model, [any_(INTS)] * 5),
        "validate_optimizer": (core.validate_optimizer, [any_(FLOATS)] * 5),
        "validate_sampling": (core.validate_sampling, [any_(FLOATS), any_(INTS), any_(FLOATS)]),
        "lanes": (core.lanes, [any_(INTS), any_(INTS)]),
        "plan_teams": (lambda *a: core.plan_teams(threads=a[0], cores=a[1], batch_size=a[2], seq_len=a[3]), [any_(INTS)] * 4),
        "training_memory_bytes": (
            lambda *a: core.training_memory_bytes(*a[:5], batch_size=a[5], seq_len=a[6], threads=a[7], cores=a[8]),
            [any_(INTS)] * 9),
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
        "Trainer": (lambda *a: core.Trainer(*a[:5], threads=a[5], seed=a[6], grad_clip=a[7], cores=a[8]),
                    [any_(INTS)] * 7 + [any_(FLOATS), any_(INTS)]),
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


# -- the command line ---------------------------------------------------------

# Values for options and arguments by the type of the parameter: (sane, hostile).
# Relative paths are inside the sandbox (the working directory of every example).
VALUES = {
    int: (["1", "2", "4", "16"], ["-1", "0", "3", "2147483648", "1000000000000", "18446744073709551616",
                                  "-9223372036854775808", "1" + "0" * 30]),
    float: (["0.001", "0.05", "0.5", "1"], ["nan", "inf", "-inf", "1e-50", "1e300", "-1", "0", "9.99", "1e23",
                                            "18446744073709551616"]),
    Path: (["corpus", "corpus/a.py", "run", "hf", "good.toml", "out"],
           ["bad.toml", "missing", "out/deeper", "", ".", "/dev/null/x", "/dev/zero", "corpus/a.py/x", "\udcff"]),
    str: (["quick", "tiny", "hf", ".py", "http://127.0.0.1:9/"],
          ["auto", "onnx", "py", "a.*", "(", "https://localhost:1/", "ftp://example.com/", "http://[::1"]),
}
# Sane values of parameters (by name) that need more than their type's to get far.
SANE = {"checkpoint_path": ["run"], "run_dir": ["run"], "path": ["run"], "source": ["hf"], "config": ["good.toml"],
        "data": ["corpus", "corpus/a.py"], "tokenizer": ["run/ckpt-00000002/tokenizer.json"], "file": ["corpus/a.py"],
        "prompt_file": ["corpus/a.py"], "watch": ["corpus"], "directory": ["."], "vocab_size": ["300", "512"],
        "embed_dim": ["16", "32"], "num_layers": ["1", "2"], "num_heads": ["2"], "seq_len": ["8", "16"],
        "batch_size": ["2", "4"], "threads": ["1", "2"], "cores": ["1", "3"], "max_steps": ["1", "3"], "epochs": ["1"],
        "max_tokens": ["4", "16"], "num_samples": ["1", "3"], "learning_rate": ["0.001", "0.01"],
        "ext": [".py", ".txt"], "fmt": ["hf"], "preset": ["tiny", "auto"], "prompt": ["def f(x):", "x"],
        "text": ["hello world"], "runs_dir": ["."], "prompts": ["corpus/a.py"], "samples": ["1", "2"],
        "start_urls": ["http://127.0.0.1:9/"], "allow": ["127"], "deny": ["x"], "user_agent": ["crystalline-fuzz"]}
# Values no parameter takes; typer refuses most before a command runs.
JUNK = ["", " ", "x", "-", "--", "1e23", "0x10", "\u00fc\u20ac\U0001f600", "\udcff", "nan", "\u202e1"]
# str parameters that name files or directories.
PATH_NAMES = {"checkpoint_dir", "tokenizer", "data"}
# Per example, the percentage of junk and of hostile values among its values:
# calm examples get past typer and the checks to real work, wild ones rarely do.
MOODS = [(0, 5), (10, 40), (30, 60)]
# A few KB of text to train on, and settings that train on it in a moment.
CORPUS = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(150))
GOOD_TOML = ("vocab_size = 300\nn_embd = 16\nn_layer = 1\nn_head = 2\nseq_len = 16\nbatch_size = 4\n"
             "max_steps = 2\nsample_tokens = 4\nthreads = 2\nprogress = false\n")
EXIT_CODES = {0, 1, 2, 130}  # success, a declined deletion or click's abort, bad input, Ctrl-C
# Modules that commands import only when they need them, imported before the
# examples run: an alarm that stopped an example half-way through importing one
# would leave a broken module behind for the examples after it.
LAZY_IMPORTS = ("matplotlib.pyplot", "crystalline.serve", "crystalline.dashboard", "tensorboardX", "torch")
# The alarm raised in a callback that Python runs and whose exceptions it only
# prints (a weakref's or the garbage collector's): the example ran past its time.
IGNORED_OVERRUN = re.compile(r"Exception ignored in: .*?\nOverrun: \n", re.S)


class Overrun(BaseException):
    """An example ran past its time: legitimate work, stopped."""


def _on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Overrun


def build_sandbox(root: Path) -> None:
    """The files every example starts from: a tiny corpus, a run trained on
    it for two steps, that run's Hugging Face export and two settings files."""
    from rich.console import Console

    from crystalline import hf
    from crystalline.config import TrainConfig
    from crystalline.train import Trainer

    (root / "corpus").mkdir(parents=True)
    (root / "corpus" / "a.py").write_text(CORPUS)
    (root / "corpus" / "b.txt").write_text(CORPUS.upper())
    (root / "good.toml").write_text(GOOD_TOML)
    (root / "bad.toml").write_text('learning_rate = "x"\n')
    cfg = TrainConfig(data=[str(root / "corpus")], vocab_size=300, n_embd=16, n_layer=1, n_head=2, seq_len=16,
                      val_fraction=0.0, batch_size=4, max_steps=2, sample_tokens=0, threads=2, progress=False,
                      checkpoint_dir=str(root / "run"))
    Trainer(cfg, Console(file=io.StringIO())).run()
    hf.export(root / "run", root / "hf")


def commands() -> dict[str, object]:
    """'train', 'models info', ...: every command of the typer app, as click commands."""
    import typer.main

    import crystalline.cli

    found = {}

    def walk(cmd, path: tuple[str, ...]) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))
        if not hasattr(cmd, "commands"):
            found[" ".join(path)] = cmd

    walk(typer.main.get_command(crystalline.cli.app), ())
    return found


def values_for(param, mood: tuple[int, int]) -> st.SearchStrategy[str]:
    """Values for one option or argument, by its annotation (list[X]: X's)."""
    kind = param.type_descriptor.annotation
    kind = (typing.get_args(kind) or (kind,))[0]
    sane, hostile = VALUES[Path if param.name in PATH_NAMES else kind]
    sane = SANE.get(param.name, sane)
    junk, bad = mood  # hypothesis favours small integers and early choices: the sane pool comes first
    pools = [sane] * (100 - junk - bad) + [hostile] * bad + [JUNK] * junk
    return st.sampled_from(pools).flatmap(st.sampled_from)


@st.composite
def command_lines(draw, found: dict[str, object]) -> list[str]:
    """A command and any subset of its parameters, in any order."""
    name = draw(st.sampled_from(sorted(found)))
    mood = draw(st.sampled_from(MOODS))
    words: list[list[str]] = []
    for param in found[name].params:
        argument = param.param_type_name == "argument"
        # optional arguments always: `train` without DATA would prepare the whole standard library
        given = draw(st.sampled_from([True] * 9 + [False])) if param.required else (
            argument or draw(st.sampled_from([False] * 3 + [True])))
        if not given:
            continue
        repeats = draw(st.integers(1, 2)) if param.multiple or param.nargs == -1 else 1
        if argument:
            words += [[draw(values_for(param, mood))] for _ in range(repeats)]
        elif getattr(param, "is_flag", False):
            words.append([draw(st.sampled_from(param.opts + param.secondary_opts))])
        else:
            words += [[draw(st.sampled_from(param.opts)), draw(values_for(param, mood))] for _ in range(repeats)]
    order = draw(st.permutations(range(len(words))))
    return [*name.split(), *(w for i in order for w in words[i])]


def run_command_line(argv: list[str], limit_s: float) -> tuple[str, str]:
    """Run `crystalline ARGV` in this process for at most `limit_s` seconds:
    (outcome, stderr), the outcome an exit code or "overran". Any exception
    other than SystemExit escaping `main` propagates: that is a traceback."""
    import crystalline.cli

    sys.argv = ["crystalline", *argv]
    err = io.StringIO()
    try:
        signal.setitimer(signal.ITIMER_REAL, limit_s)
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(err):
                crystalline.cli.main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Overrun:
        return "overran", err.getvalue()
    stderr, ignored = IGNORED_OVERRUN.subn("", err.getvalue())
    return ("overran" if ignored else str(code)), stderr


def fuzz_cli(examples: int, seed: int, limit_s: float) -> collections.Counter:
    """Run `examples` drawn command lines, each on a fresh copy of the
    sandbox; raise on a traceback or an exit code outside EXIT_CODES (3 only
    for a diverging loss). Returns the count of each outcome."""
    tmp = Path(tempfile.mkdtemp(prefix="crystalline-fuzz-"))
    os.environ["XDG_CACHE_HOME"] = str(tmp / "xdg")
    pristine, work = tmp / "pristine", tmp / "work"
    build_sandbox(pristine)
    for name in LAZY_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:  # an extra not installed: the commands that need it refuse to run
            pass
    found = commands()
    signal.signal(signal.SIGALRM, _on_alarm)
    counts: collections.Counter = collections.Counter()

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(command_lines(found))
    def run(argv):
        os.chdir(tmp)
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work, symlinks=True)
        os.chdir(work)
        print(f"crystalline {' '.join(map(repr, argv))}", file=sys.__stderr__, flush=True)
        try:
            outcome, stderr = run_command_line(argv, limit_s)
        except Exception:
            raise AssertionError(f"traceback from crystalline {argv}:\n{traceback.format_exc()}") from None
        diverged = outcome == "3" and "training diverged" in stderr
        if outcome != "overran" and int(outcome) not in EXIT_CODES and not diverged:
            raise AssertionError(f"exit code {outcome} from crystalline {argv}:\n{stderr}")
        if "Traceback" in stderr:
            raise AssertionError(f"a traceback on stderr from crystalline {argv}:\n{stderr}")
        counts[outcome] += 1

    try:
        hypothesis.seed(seed)(run)()
    finally:
        os.chdir("/")
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=["core", "cli"])
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-s", type=float, default=1.0, help="cli: seconds one example may run before it is stopped")
    args = ap.parse_args(argv)
    if args.target == "core":
        fuzz_core(args.examples, args.seed)
        print(f"fuzzed core: {args.examples} examples, no crash", flush=True)
    else:
        counts = fuzz_cli(args.examples, args.seed, args.limit_s)
        outcomes = ", ".join(f"{'exit ' if k.isdigit() else ''}{k}: {n}" for k, n in sorted(counts.items()))
        print(f"fuzzed cli: {sum(counts.values())} examples, no crash ({outcomes})", flush=True)


if __name__ == "__main__":
    main()
