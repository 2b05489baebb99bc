"""Type stubs for `crystalline._core`, the Rust extension module.

Every function takes numpy arrays (float32 for values, any integer dtype
for token ids) of any layout: C-contiguous ones are borrowed, others copied
(only `adamw_update`'s in-place buffers must be C-contiguous). It raises
TypeError for a wrong dtype and ValueError for a wrong rank, shape or token
id, and releases the GIL while it computes. Shapes: N rows, C channels, OC output channels, B batch,
T time, V vocab, NH heads.
"""

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U16 = npt.NDArray[np.uint16]
Ids = npt.NDArray[np.integer]

__version__: str
SYMMETRY_GROUPS: int
"""Every token id belongs to group `id % SYMMETRY_GROUPS`."""
LOGIT_CHUNK: int
"""Rows of logits the loss computes at once."""

def validate_model(vocab_size: int, n_embd: int, n_layer: int, n_head: int, block_size: int) -> None:
    """ValueError saying what to change when the shape cannot be built."""
def validate_optimizer(
    beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1, grad_clip: float = 1.0
) -> None:
    """ValueError when AdamW or gradient clipping cannot use these settings."""
def validate_sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
    """ValueError when these sampling settings cannot draw a token."""
def available_cores() -> int: ...
def lanes(threads: int, cores: int | None = None) -> int:
    """Lanes of working memory (gradients and activations) a Trainer of `threads` threads keeps on
    `cores` cores (None: every core this process may use)."""
def plan_teams(*, threads: int, cores: int, batch_size: int, seq_len: int) -> dict[str, list[int]]:
    """The plan of one step: {"cores": cores of each lane's team, "quota": sequences each lane runs}."""
def training_memory_bytes(
    vocab_size: int, n_embd: int, n_layer: int, n_head: int, block_size: int, *, batch_size: int, seq_len: int,
    threads: int, cores: int | None = None, precision: str = "fp32"
) -> int:
    """Bytes a Trainer allocates to train this shape on [batch_size, seq_len] batches on `cores` cores
    (None: every core this process may use), its matmuls in `precision` ("fp32" or "bf16": the weights
    rounded to bf16 too)."""
def parameter_shapes(
    vocab_size: int, n_embd: int, n_layer: int, n_head: int, block_size: int
) -> list[tuple[str, list[int]]]: ...
def bf16_supported() -> bool:
    """Whether this CPU has avx512_bf16 (the bf16 matmuls run on it)."""
def to_bf16(x: F32) -> U16:
    """The bf16 bit patterns of x (rounded to nearest, ties to even), same shape."""
def matmul_forward(inp: F32, weight: F32 | U16, bias: F32 | None = None) -> F32:
    """inp [N, C] @ weight [C, OC] + bias [OC] -> [N, OC]; a uint16 weight (from
    `to_bf16`) multiplies in bf16 (inp rounded too, float32 sums)."""
def matmul_backward(dout: F32, inp: F32, weight: F32) -> tuple[F32, F32, F32]:
    """-> (dinp [N, C], dweight [C, OC], dbias [OC])"""
def layernorm_forward(inp: F32, weight: F32, bias: F32) -> tuple[F32, F32, F32]:
    """inp [N, C] -> (out [N, C], mean [N], rstd [N])"""
def layernorm_backward(dout: F32, inp: F32, weight: F32, mean: F32, rstd: F32) -> tuple[F32, F32, F32]:
    """-> (dinp [N, C], dweight [C], dbias [C])"""
def gelu_forward(inp: F32) -> F32: ...
def gelu_backward(dout: F32, inp: F32) -> F32: ...
def residual_forward(a: F32, b: F32) -> F32: ...
def residual_backward(dout: F32) -> tuple[F32, F32]: ...
def encoder_forward(tokens: Ids, wte: F32, wpe: F32) -> F32:
    """tokens [B, T], wte [V, C], wpe [T_max, C] -> [B, T, C]"""
def encoder_backward(dout: F32, tokens: Ids, vocab_size: int, block_size: int) -> tuple[F32, F32]:
    """-> (dwte [V, C], dwpe [block_size, C])"""
def attention_forward(qkv: F32, n_head: int) -> tuple[F32, F32]:
    """Causal, tiled: qkv [B, T, 3C] -> (out [B, T, C], lse [B, NH, T], each row's log-sum-exp of scores)"""
def attention_backward(dout: F32, qkv: F32, output: F32, lse: F32, n_head: int) -> F32:
    """dout [B, T, C], and the forward's qkv, output [B, T, C] and lse [B, NH, T] -> dqkv [B, T, 3C]"""
def crossentropy_forward(logits: F32, targets: Ids) -> F32:
    """logits [N, V], targets [N] -> per-row losses [N]"""
def crossentropy_backward(logits: F32, targets: Ids, dlosses: F32) -> F32:
    """-> dlogits [N, V]"""
def softmax_crossentropy(logits: F32, targets: Ids) -> tuple[float, F32]:
    """Fused: -> (mean loss, dlogits of the mean loss [N, V])"""
def adamw_update(
    params: F32,
    grads: F32,
    m: F32,
    v: F32,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One AdamW step (1-based `step`), in place on params, m and v."""

class Model:
    """A GPT-2 model whose parameters live in one flat float32 buffer in Rust."""

    def __init__(
        self, vocab_size: int, n_embd: int, n_layer: int, n_head: int, block_size: int, seed: int = 0
    ) -> None: ...
    def config(self) -> dict[str, int]: ...
    def parameters(self) -> dict[str, F32]:
        """GPT-2 tensor name -> writeable zero-copy view."""
    def num_parameters(self) -> int: ...
    def forward(self, tokens: Ids) -> F32:
        """tokens [B, T] -> logits [B, T, V]"""
    def loss(self, tokens: Ids, targets: Ids) -> float:
        """Mean cross-entropy of the model's logits against targets [B, T]."""
    def loss_and_grad(self, tokens: Ids, targets: Ids) -> tuple[float, dict[str, F32]]:
        """(mean loss, name -> gradient view); the next call overwrites the views."""
    def set_threads(self, threads: int) -> None:
        """Run this model's work on a private pool of `threads` threads."""
    precision: str
    """"fp32" or "bf16": what the matmuls run in."""
    def set_precision(self, precision: str) -> None:
        """Run the matmuls in "fp32" or "bf16" (bf16 operands, float32 sums). The weights
        are rounded to bf16 now: call again after writing them through `parameters()`."""
    def reset_cache(self, batch_size: int, seed: int = 0) -> None:
        """Empty key/value caches for `batch_size` sequences; seed the sampler."""
    def cache_lengths(self) -> list[int]: ...
    def clear_sequence(self, seq: int) -> None:
        """Empty one sequence's cache (to refill it with a slid window)."""
    def decode(self, seqs: list[int], tokens: Ids, want_logits: bool = True) -> F32 | None:
        """Feed tokens[i] to sequence seqs[i] (a sequence listed k times takes k consecutive
        positions: a whole prompt in one call); -> next-token logits [M, V] (None when not wanted)."""
    def sample(self, logits: F32, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[int]:
        """One token per row of logits [M, V]: greedy at temperature 0, else top-k / nucleus (top-p) sampling."""

class Sampler:
    """A seeded random stream of its own for drawing tokens, one per generated sequence:
    what it draws depends on (seed, stream) alone, not on other sequences decoded beside it."""

    def __init__(self, seed: int = 0, stream: int = 0) -> None: ...
    def sample(self, logits: F32, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[int]:
        """One token per row of logits [M, V]: greedy at temperature 0, else top-k / nucleus (top-p) sampling."""

class Trainer:
    """The kissing-sphere trainer: a model, its AdamW state and `threads` threads dividing `cores` cores
    (None: every core this process may use) among them."""

    threads: int
    cores: int
    step_count: int
    dealt: int
    precision: str
    """"fp32" or "bf16": what the matmuls run in."""

    def __init__(
        self,
        vocab_size: int,
        n_embd: int,
        n_layer: int,
        n_head: int,
        block_size: int,
        *,
        threads: int = 12,
        cores: int | None = None,
        seed: int = 0,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        grad_clip: float = 1.0,
    ) -> None: ...
    def num_parameters(self) -> int: ...
    def parameters(self) -> dict[str, F32]: ...
    def optimizer_state(self) -> tuple[dict[str, F32], dict[str, F32]]: ...
    def set_precision(self, precision: str) -> None:
        """Run the matmuls in "fp32" or "bf16"; the weights are rounded now and after
        every step: call again after writing them through `parameters()`."""
    def step(self, batch: Ids, lr: float) -> dict:
        """One AdamW step on batch [B, T+1]; raises FloatingPointError on a NaN/inf loss.
        -> {loss (mean), grad_norm, group_sequences [12], compute_s, step_s,
            spheres: [{micro_batches, sequences, tokens, loss_sum, busy_s}]}"""
    def gradients(self, batch: Ids, *, batch_size: int | None = None, offset: int = 0) -> dict:
        """`step`'s forward and backward passes only, for one process's rows
        `offset..offset+B` of a global batch of `batch_size` (default B)
        sequences; the summed gradient, scaled for the global mean loss, is
        left in `gradient()` for `apply`.
        -> {loss_sum (summed token losses), group_sequences [12], compute_s, spheres}"""
    def gradient(self) -> F32:
        """[P] writeable zero-copy view of the summed gradient, in flat parameter order."""
    def apply(self, lr: float, loss: float) -> float:
        """Clip `gradient()` to the global norm and take the AdamW step; `loss` is the
        global batch's mean loss. -> the norm before clipping; FloatingPointError on NaN/inf."""
    def eval(self, batch: Ids) -> float:
        """Mean loss of batch [B, T+1], forward only, on the spheres."""
