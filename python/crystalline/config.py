"""Configuration: the GPT-2 shape of a model (`ModelConfig`), the settings of
a training run (`TrainConfig`), the named presets, `--config` TOML files and
the checks that refuse settings which cannot train.

Settings use the model's names (`n_embd`, `n_layer`, `n_head`); the command
line keeps its flags `--embed-dim --num-layers --num-heads`, and TOML files
and the state.json of older checkpoints may still use those older names:
`LEGACY_NAMES` maps them, here and nowhere else.

The parameter layout (names and shapes) comes from the Rust core, so the count
printed by `crystalline size` is the count of the model that `train` builds.
"""

from __future__ import annotations

import math
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from crystalline import _core
from crystalline.errors import UserError
from crystalline.guard import read_text

# The core's sizes, counts and seeds are unsigned 64-bit integers.
U64_END = 2**64
# Bytes of one of the core's float32 values.
F32_BYTES = 4


def check_unsigned(name: str, value: object, minimum: int = 0) -> None:
    """ValueError naming `name` unless `value` is an integer from `minimum`
    to 2**64 - 1 (the core refuses other values without naming the argument)."""
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < U64_END:
        raise ValueError(f"{name} must be an integer from {minimum} to 2**64 - 1, got {value!r}")


def _matches(value: object, hint: object) -> bool:
    """Whether a value parsed from TOML or JSON has the type `hint` (an int
    counts as a float; a dataclass is read from a dict)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if is_dataclass(hint):
        return isinstance(value, dict)
    return isinstance(value, hint)


def _describe(hint: object) -> str:
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict or is_dataclass(hint):
        return "a table"
    return words.get(hint, str(hint))


def check_types(values: Mapping, hints: Mapping[str, object], where: str) -> None:
    """UserError naming `where` and the setting unless each of `values` that
    `hints` names has its type."""
    for name, value in values.items():
        if name in hints and not _matches(value, hints[name]):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(f"{where}: {name} must be {_describe(hints[name])}, got {shown}")


@dataclass(frozen=True)
class ModelConfig:
    """The GPT-2 shape of a model, under the names GPT-2 and the Rust core use."""

    vocab_size: int = 4096  # V: tokens the model can read and predict
    n_embd: int = 128  # C: width of the residual stream
    n_layer: int = 4  # L: transformer blocks
    n_head: int = 4  # NH: attention heads per block (n_embd % n_head == 0)
    block_size: int = 128  # T_max: longest context, rows of the position table

    def validate(self) -> None:
        """Raise ValueError with a message that says what to change (the
        Rust core's check, the one every model it builds passes)."""
        for name, value in asdict(self).items():  # the core would refuse them without the name
            check_unsigned(name, value, minimum=1)
        _core.validate_model(**asdict(self))

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(GPT-2 tensor name, shape) in the order of the flat parameter buffer."""
        self.validate()
        return [(n, tuple(s)) for n, s in _core.parameter_shapes(**asdict(self))]

    def num_parameters(self) -> int:
        """Exact parameter count (the output head is tied to `wte`, so not counted twice)."""
        return sum(math.prod(shape) for _, shape in self.parameter_shapes())

    def model_bytes(self) -> int:
        """Bytes a `_core.Model` of this shape allocates: its parameters and their gradients."""
        return 2 * F32_BYTES * self.num_parameters()

    def generation_bytes(self, sequences: int, rows: int) -> int:
        """Bytes generating takes beside the model: key/value caches for
        `sequences` sequences and the logits of `rows` rows decoded at once."""
        cache = 2 * self.n_layer * self.block_size * self.n_embd
        return F32_BYTES * (sequences * cache + rows * self.vocab_size)

    def training_memory_bytes(self, batch_size: int, seq_len: int, threads: int = 12, cores: int | None = None,
                              precision: str = "fp32") -> int:
        """Bytes the Rust trainer allocates to train this shape on `cores`
        cores (None: every core this process may use): weights and AdamW
        moments once, then per lane of working memory a gradient buffer, a
        micro-batch's activations and a chunk of logits (computed from the
        formulas the allocation uses). A step's plan has at most
        min(cores, threads - 1, batch_size) lanes, whatever its teams' sizes.
        With `precision` "bf16", also the weights rounded to bf16."""
        return _core.training_memory_bytes(**asdict(self), batch_size=batch_size, seq_len=seq_len, threads=threads,
                                           cores=cores, precision=precision)


# The older names of TrainConfig fields, still the names of the command-line
# flags (--embed-dim ...) and accepted in TOML files and saved state.json.
LEGACY_NAMES = {"embed_dim": "n_embd", "num_layers": "n_layer", "num_heads": "n_head"}
# Each field's flag, where its name differs; block_size is set by --seq-len.
_FLAG_NAMES = {new: old for old, new in LEGACY_NAMES.items()} | {"block_size": "seq_len"}
# Epochs of a --watch run when none are asked for: in effect until Ctrl-C.
WATCH_EPOCHS = 1_000_000_000
# The --precision choices (what each means: crystalline.precision).
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    """Every setting of a training run; `crystalline train` has a flag for most."""

    # data
    data: list[str] = field(default_factory=list)  # files/directories of text; empty = built-in corpus
    extensions: list[str] | None = None  # only files with these extensions
    tokenizer: str | None = None  # use this tokenizer.json instead of training one
    val_fraction: float = 0.05  # documents held out for validation
    watch: str | None = None  # keep training on this directory, picking up new and changed files
    watch_interval: int | None = None  # steps between checks of --watch (default: each epoch boundary)
    # model (ModelConfig; the block size is seq_len)
    preset: str | None = None  # quick, tiny, small, seed or auto (from the data size)
    vocab_size: int = 4096  # tokenizer and model vocabulary (V)
    n_embd: int = 128  # residual width (C); flag --embed-dim
    n_layer: int = 4  # transformer blocks (L); flag --num-layers
    n_head: int = 4  # attention heads (NH), must divide n_embd; flag --num-heads
    # batch and schedule
    batch_size: int = 16  # sequences per optimizer step (B)
    seq_len: int = 128  # tokens per sequence (T); also the model's block size
    learning_rate: float = 3e-4  # peak learning rate, after warmup
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * this
    warmup_steps: int = 100  # linear warmup from 0
    epochs: int = 1  # passes over the training split
    max_steps: int | None = None  # stop after this many steps in all
    # optimizer (AdamW)
    weight_decay: float = 0.1  # decoupled decay on matrices
    grad_clip: float = 1.0  # clip the gradient's global norm (0: off)
    # system
    threads: int = 12  # sphere threads: Node Zero + workers
    cores: int | None = None  # cores the spheres divide into teams (None: every core this process may use)
    precision: str = "fp32"  # matmul precision: fp32, bf16 or auto (crystalline.precision)
    seed: int = 0  # initialisation and data order
    # checkpoints, validation and reports
    checkpoint_dir: str = ""  # the run directory (default: runs/<date-time>)
    save_interval: int = 500  # steps between checkpoints (and one at the end)
    keep: int = 3  # checkpoints kept
    eval_interval: int = 200  # steps between validation losses
    eval_batches: int = 8  # batches per validation
    sample_tokens: int = 120  # tokens sampled after training (0: none)
    verbose: bool = False  # a line per sphere per step
    progress: bool = True  # the rich progress bar
    estimate: bool = True  # time a few steps of the config before step 1 and say how long the run will take
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars into RUN/tb/

    def model_config(self) -> ModelConfig:
        return ModelConfig(self.vocab_size, self.n_embd, self.n_layer, self.n_head, self.seq_len)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """The config a saved state.json records, whatever names it used;
        settings of other versions that no longer exist are dropped."""
        known = field_names()
        return cls(**{k: v for k, v in canonical(values).items() if k in known})

    def validate(self) -> None:
        """Refuse settings that cannot train, with the flag to change."""
        check_types(asdict(self), typing.get_type_hints(TrainConfig), "the training settings")
        counts = ("batch_size", "epochs", "threads", "save_interval", "eval_interval", "eval_batches")
        try:
            for name in counts:
                check_unsigned(name, getattr(self, name), minimum=1)
            check_unsigned("seed", self.seed)
            self.model_config().validate()
            _core.validate_optimizer(weight_decay=self.weight_decay, grad_clip=self.grad_clip)
        except ValueError as err:
            raise flagged(err, [*counts, *asdict(self.model_config()), "weight_decay", "grad_clip", "seed"]) from None
        if self.watch_interval is not None and (self.watch is None or self.watch_interval < 1):
            raise UserError("--watch-interval needs --watch DIR and a positive number of steps")
        if self.watch is not None and not Path(self.watch).is_dir():
            raise UserError(f"--watch {self.watch} is not a directory")
        if self.cores is not None and not 1 <= self.cores <= _core.MAX_THREADS:
            raise UserError(f"--cores must be from 1 to {_core.MAX_THREADS}, got {self.cores}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1, got {self.max_steps}")
        if not (0 < self.learning_rate < 10) or not math.isfinite(self.learning_rate):
            raise UserError(f"--learning-rate must be in (0, 10), got {self.learning_rate}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("warmup_steps", "keep", "sample_tokens"):
            if getattr(self, name) < 0:
                raise UserError(f"{flag(name)} must not be negative, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def capped_threads(threads: int) -> tuple[int, str | None]:
    """`threads`, at most the core's MAX_THREADS, and the warning that says
    when it was capped."""
    if threads <= _core.MAX_THREADS:
        return threads, None
    return _core.MAX_THREADS, f"--threads {threads} is more than {_core.MAX_THREADS}; using {_core.MAX_THREADS}"


def canonical(values: dict) -> dict:
    """Settings under TrainConfig's names: dashes as underscores, legacy names mapped."""
    out = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        out[LEGACY_NAMES.get(key, key)] = value
    return out


def flag(name: str) -> str:
    """The command-line flag that sets field `name` (n_embd: --embed-dim)."""
    return "--" + _FLAG_NAMES.get(name, name).replace("_", "-")


def flagged(err: ValueError, names: Iterable[str]) -> UserError:
    """A ValueError from the core, with each of `names` it mentions written as its flag."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    return UserError(pattern.sub(lambda m: flag(m[1]), str(err)))


# Named shapes and schedules. Flags and --config override any field.
PRESETS: dict[str, dict] = {
    # The default: 4,000 steps of 2,048 tokens on the built-in corpus (README: Quick start).
    "quick": dict(vocab_size=4096, n_embd=128, n_layer=4, n_head=4, batch_size=16, seq_len=128,
                  learning_rate=3e-3, warmup_steps=100, max_steps=4000, eval_interval=500, epochs=1),
    # The three shapes of benches/train_vs_torch.py.
    "tiny": dict(vocab_size=4096, n_embd=128, n_layer=4, n_head=4, batch_size=16, seq_len=128),
    "small": dict(vocab_size=8192, n_embd=256, n_layer=4, n_head=8, batch_size=16, seq_len=128),
    "seed": dict(vocab_size=30000, n_embd=384, n_layer=6, n_head=12, batch_size=32, seq_len=128,
                 learning_rate=1e-4),
}
# What may change when a run is resumed: how it is watched, saved and how
# far it goes. Its shape, data and schedule stay as saved.
RESUME_ADJUSTABLE = {"epochs", "max_steps", "eval_interval", "eval_batches", "save_interval", "keep", "verbose",
                     "progress", "sample_tokens", "checkpoint_dir", "threads", "cores", "watch_interval",
                     "tensorboard", "precision", "estimate"}


def load_toml(path: Path) -> dict:
    """Read a --config TOML file of TrainConfig fields (dashes or underscores,
    legacy names too), each of the type its field has."""
    where = f"config file {path}"
    try:
        raw = tomllib.loads(read_text(Path(path), where))
    except (tomllib.TOMLDecodeError, RecursionError) as err:
        raise UserError(f"{where} is not valid TOML ({err})") from None
    values = canonical(raw)
    unknown = sorted(set(values) - field_names())
    if unknown:
        raise UserError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    check_types(values, typing.get_type_hints(TrainConfig), where)
    return values


def build_config(overrides: dict, config_file: Path | None = None, preset: str | None = None) -> TrainConfig:
    """Defaults <- preset <- TOML file <- explicit overrides (flags, under field names)."""
    from_file = load_toml(config_file) if config_file else {}
    preset = overrides.get("preset") or from_file.get("preset") or preset
    values: dict = {}
    if preset and preset != "auto":
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of {', '.join([*PRESETS, 'auto'])}")
        values.update(PRESETS[preset])
    values.update(from_file)
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    explicit = set(given) | set(from_file)
    if ("epochs" in explicit or "watch" in explicit) and "max_steps" not in explicit:
        values.pop("max_steps", None)  # asking for epochs (or to watch) means all of them, not the preset's cap
    if "watch" in explicit and "epochs" not in explicit:
        values["epochs"] = WATCH_EPOCHS  # watching goes on until Ctrl-C
    values["preset"] = preset
    try:
        return TrainConfig(**values)
    except TypeError as err:
        raise UserError(f"bad setting: {err}") from None


def resume_config(saved: TrainConfig, overrides: dict, run_dir: Path | str) -> TrainConfig:
    """The saved config of the run in `run_dir` with `overrides` (under
    field names; None: not given), which may change only how the run is
    watched, saved and how far it goes."""
    given = {k: v for k, v in overrides.items() if v is not None}
    fixed = sorted(k for k, v in given.items() if k not in RESUME_ADJUSTABLE and v != getattr(saved, k, None))
    if fixed:
        names = ", ".join(flag(k) for k in fixed)
        raise UserError(f"a resumed run keeps its settings; {names} cannot change (start a new run instead)")
    return TrainConfig(**{**asdict(saved), **given, "checkpoint_dir": str(run_dir)})
