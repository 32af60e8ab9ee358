"""Torch device names from the command line, checked before any work starts.

    check_device("cuda:1", "--device")   # UserError unless this machine has a second CUDA device

opdlab computes on `cpu` and `cuda` (`cuda:N`); a name torch cannot parse, another device kind
(`meta`, `mps`, ...) or a CUDA device this machine does not have is one line naming the flag.
"""

from __future__ import annotations

import torch

from opdlab.errors import UserError


def check_device(name: str, flag: str) -> str:
    """`name` when opdlab can compute on it here; else a UserError naming `flag` (e.g. '--device')."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{flag} {name!r}: not a torch device name ({first[:120]}); use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise UserError(f"{flag} {name!r}: opdlab computes on cpu or cuda, not on {device.type} devices; use cpu or cuda")
    if not torch.cuda.is_available():
        built = "has no CUDA support" if not torch.backends.cuda.is_built() else "finds no CUDA device"
        raise UserError(f"{flag} {name!r}: this torch ({torch.__version__}) {built}; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UserError(f"{flag} {name!r}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return name
