"""Model configuration: the GPT-2 shape of a Crystalline model, its exact
parameter count and the memory needed to train it.

The parameter layout (names and shapes) comes from the Rust core, so the count
printed by `crystalline size` is the count of the model that `train` builds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from crystalline import _core

# AdamW keeps two moments per parameter; training also holds one gradient.
_BYTES_PER_F32 = 4


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
        """f32 values the forward pass keeps per token for the backward pass."""
        c, l, nh, t = self.n_embd, self.n_layer, self.n_head, self.block_size
        per_layer = 3 * c + 3 * c + c + nh * t + c + c + 3 * c + 4 * c + 4 * c + c + c
        return c + l * (per_layer + 4) + 3 * c

    def training_memory_bytes(self, batch_size: int, seq_len: int, logits_rows: int | None = None) -> int:
        """Bytes to train: weights, gradients, AdamW moments, activations for
        `batch_size` sequences of `seq_len` tokens, and one chunk of logits."""
        params = self.num_parameters()
        tokens = batch_size * seq_len
        logits = (logits_rows if logits_rows is not None else tokens) * self.vocab_size
        floats = 4 * params + tokens * self.activation_floats_per_token() + 2 * logits
        return floats * _BYTES_PER_F32


def _divisor_near(n: int, k: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - k), d))
