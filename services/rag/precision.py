"""How the generator's weights are stored: the precision setting and the dtype it means here."""

from __future__ import annotations

from typing import Literal

import torch

# The generator's weights: bfloat16 where the hardware multiplies it natively (a GPU, or a CPU with
# AMX or AVX512-BF16: 3x faster prefill than float32 on 2 cores), else float32; or either, forced.
Precision = Literal["auto", "float32", "bfloat16"]


def native_bfloat16() -> bool:
    """True on a CUDA GPU and on CPUs with bfloat16 matrix instructions (AMX tiles or AVX512-BF16)."""
    if torch.cuda.is_available():
        return True
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_dtype(precision: Precision) -> torch.dtype:
    """The dtype a precision setting means on this machine."""
    if precision == "auto":
        return torch.bfloat16 if native_bfloat16() else torch.float32
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}")
    return getattr(torch, precision)
