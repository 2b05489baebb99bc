"""Model configuration: the GPT-2 shape of a Crystalline model, its exact
parameter count and the memory needed to train it.

The parameter layout (names and shapes) comes from the Rust core, so the count
printed by `crystalline size` is the count of the model that `train` builds.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from crystalline import _core

_BYTES_PER_F32 = 4
SYMMETRY_GROUPS = _core.SYMMETRY_GROUPS
# Rows of logits the Rust core computes at once (model.rs LOGIT_CHUNK).
LOGIT_CHUNK = 128


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096  # V: tokens the model can read and predict
    n_embd: int = 128  # C: width of the residual stream
    n_layer: int = 4  # L: transformer blocks
    n_head: int = 4  # NH: attention heads per block (n_embd % n_head == 0)
    block_size: int = 128  # T_max: longest context, rows of the position table

    def validate(self) -> None:
        """Raise ValueError with a message that says what to change."""
        for name in ("vocab_size", "n_embd", "n_layer", "n_head", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"embed dim {self.n_embd} is not divisible by num heads {self.n_head}; "
                f"choose a head count that divides it (e.g. {_divisor_near(self.n_embd, self.n_head)})"
            )

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(GPT-2 tensor name, shape) in the order of the flat parameter buffer."""
        self.validate()
        return [(n, tuple(s)) for n, s in _core.parameter_shapes(**asdict(self))]

    def num_parameters(self) -> int:
        """Exact parameter count (the output head is tied to `wte`, so not counted twice)."""
        return sum(math.prod(shape) for _, shape in self.parameter_shapes())

    def activation_floats_per_token(self) -> int:
        """f32 values one token of a micro-batch occupies in the Rust core's
        activations: per block 16C + NH*T + 4 kept for the backward pass,
        plus the embedding, final LayerNorm and 14C of backward scratch."""
        c, nh, t = self.n_embd, self.n_head, self.block_size
        return self.n_layer * (16 * c + nh * t + 4) + 2 * c + 2 + 14 * c

    def training_memory_bytes(self, batch_size: int, seq_len: int, threads: int = 12) -> int:
        """Bytes to train as Crystalline does: the weights and two AdamW
        moments once, then for each lane (one per core, at most one per
        worker sphere) a gradient buffer, the activations of one symmetry
        group's micro-batch and one chunk of logits."""
        params = self.num_parameters()
        workers = max(threads - 1, 1)
        lanes = max(1, min(available_cores(), workers, SYMMETRY_GROUPS, batch_size))
        micro_tokens = -(-batch_size // SYMMETRY_GROUPS) * seq_len
        per_lane = params + micro_tokens * self.activation_floats_per_token() + LOGIT_CHUNK * self.vocab_size
        return (3 * params + lanes * per_lane) * _BYTES_PER_F32


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _divisor_near(n: int, k: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - k), d))
