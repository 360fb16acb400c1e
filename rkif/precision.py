"""Numeric precision of a run: ``fp32``, ``bf16`` or ``fp16`` autocast, or ``auto``.

``auto`` takes bf16 where the hardware computes it natively (a CUDA device with bf16, or a CPU
whose oneDNN has bf16 kernels: AVX512-BF16 or AMX) and fp32 elsewhere: on a CPU without them bf16
autocast is emulated and slower than fp32. Training uses the Trainer's own mixed precision
(``TrainingArguments(bf16=...)``); evaluation enters ``autocast`` below around generation.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 natively (CUDA with bf16; CPU with oneDNN bf16 kernels)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def default_device_type() -> str:
    return torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"


def resolve_precision(precision: str, device_type: str | None = None) -> str:
    """The precision a run uses: ``auto`` becomes bf16 where native, else fp32; fp16 needs an accelerator."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    device_type = device_type or default_device_type()
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    if precision == "fp16" and device_type == "cpu":
        raise ValueError("--precision fp16 needs a GPU (fp16 autocast with a GradScaler); on CPU use bf16 or auto")
    if precision == "bf16" and not native_bf16(device_type):
        _warn_emulated(device_type)
    return precision


@functools.cache
def _warn_emulated(device_type: str) -> None:
    logger.warning("--precision bf16 on a %s without native bf16: emulated, expect it much slower than fp32 "
                   "(--precision auto picks the faster)", device_type)


def autocast(precision: str, device_type: str):
    """``torch.autocast`` for bf16/fp16, a no-op context for fp32."""
    if precision in _DTYPES:
        return torch.autocast(device_type=device_type, dtype=_DTYPES[precision])
    return contextlib.nullcontext()
