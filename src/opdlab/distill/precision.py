"""`run.precision`: the arithmetic of a run's forward and backward passes.

    with compute_precision("bf16-mixed", "cpu"):     # roll out, score, student forward/backward
        batch = roll_out(...); accumulate_gradients(...)

fp32: every operation in float32 (the default; the exactness tests run in it).
bf16-mixed: `torch.autocast` with bfloat16, so matrix products (linear layers, attention) take
  bf16 inputs and accumulate in fp32, while the parameters, their gradients and the optimizer
  state stay fp32 (master weights), and normalisations, softmax and residual sums run in fp32.
  `completion_logits` returns fp32 logits and the losses contain no matrix product, so the loss
  and its log-softmax are fp32 too. The optimizer step runs outside the autocast region.

bf16 products are fast only on hardware with bf16 matrix units (Intel AMX or AVX512-BF16 on a
CPU, Ampere or newer GPUs); elsewhere they are emulated, several times slower than fp32
(`precision_note` says so at the start of such a run; measurements in docs/training.md).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

PRECISIONS = ("fp32", "bf16-mixed")


def device_type(device: str | torch.device) -> str:
    """"cuda:1" -> "cuda"."""
    return torch.device(device).type


def compute_precision(precision: str, device: str | torch.device) -> ContextManager:
    """The context the forward passes of a run at `precision` run in (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device_type(device), dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")


def has_bf16_units(device: str | torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively (CPU: AMX or AVX512-BF16; CUDA: compute capability 8+)."""
    kind = device_type(device)
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True  # other accelerators: no cheap probe, assume the user chose knowingly


def precision_note(precision: str, device: str | torch.device) -> str | None:
    """A one-line note when `precision` will be slow on `device`, else None."""
    if precision == "bf16-mixed" and not has_bf16_units(device):
        return (f"run.precision bf16-mixed: {device_type(device)} has no bf16 matrix units here (AMX/AVX512-BF16 "
                "on CPUs); bf16 products are emulated and slower than fp32 (run.precision=fp32 is faster)")
    return None
