"""Which precision the matmuls run in.

- `fp32`: everything in float32.
- `bf16`: matmul operands rounded to bfloat16 (nearest even), products and
  sums in float32; weights, optimizer state, LayerNorm, softmax, GELU, the
  loss and gradient accumulation stay float32. Needs a CPU with avx512_bf16.
- `auto`: bf16 where the CPU has avx512_bf16, else fp32.

Setting the environment variable CRYSTALLINE_FORCE_FP32=1 makes every
request fp32 (to compare, or to test the float32 path on a bf16 CPU).
"""

from __future__ import annotations

import os

from crystalline import _core
from crystalline.config import PRECISIONS as CHOICES
from crystalline.errors import UserError

FORCE_FP32 = "CRYSTALLINE_FORCE_FP32"


def forced_fp32() -> bool:
    """Whether the environment forces float32."""
    return os.environ.get(FORCE_FP32, "") not in ("", "0")


def resolve(requested: str) -> str:
    """`requested` ("auto", "bf16" or "fp32") as the precision to run: "bf16" or "fp32"."""
    if requested not in CHOICES:
        raise UserError(f"--precision must be one of {', '.join(CHOICES)}, got {requested!r}")
    if forced_fp32() or requested == "fp32":
        return "fp32"
    if _core.bf16_supported():
        return "bf16"
    if requested == "bf16":
        raise UserError("--precision bf16 needs a CPU with avx512_bf16, and this one lacks it; "
                        "use --precision auto or fp32")
    return "fp32"
