"""Guards for the training loop: a graceful stop on SIGINT/SIGTERM, and non-finite losses and gradients.

    stop = StopRequest.install()              # before the loop
    ...                                       # each step, after its checkpoint block:
    if stop.requested and step < total:
        raise stop.interrupted(step, run_dir)
    stop.restore()                            # in the loop's `finally`

    if skip_nonfinite(step, loss, grad_norm, cfg.run.on_nonfinite, run_dir):
        ...                                   # no optimizer step for this batch

Design choices, and why:
1. The first SIGINT/SIGTERM only sets a flag. The loop finishes the step it is in, writes a
   checkpoint at that step (atomically, like every checkpoint) and raises `Interrupted`; the
   CLI prints one line saying how to resume and exits 128 + signal (130 for SIGINT, 143 for
   SIGTERM), the shell's convention for "ended by a signal", so schedulers and scripts can
   tell an interrupted run from a finished one (0) or a user error (2).
2. The handler puts the previous one back as it fires: a second Ctrl-C raises
   KeyboardInterrupt at once and a second SIGTERM kills the process. The last complete
   checkpoint is never at risk — checkpoints are written to a temporary folder and renamed.
3. A non-finite loss or gradient norm is checked after backward and before `optimizer.step()`,
   so bad values never reach the weights. `stop` (the default) raises `NonFiniteError`, a
   `UserError`: one line naming the step, exit code 2, nothing saved after the last good
   checkpoint. `skip` drops the batch: no optimizer step (so no weight decay or moment update
   either), but the schedule still advances so step numbers and learning rates stay aligned
   with an uninterrupted run.
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from opdlab.distill.checkpoint import list_checkpoints
from opdlab.errors import UserError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped on request after a step whose checkpoint is on disk.

    A KeyboardInterrupt, so code that already treats Ctrl-C as "stop now" keeps doing so;
    `exit_code` is 128 + the signal number, and `str()` is the one line the CLI prints.
    """

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        self.signum, self.step, self.run_dir = signum, step, Path(run_dir)
        self.exit_code = 128 + int(signum)
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step} (checkpoint saved); "
            f"resume with: opdlab distill --resume {self.run_dir}"
        )


class NonFiniteError(UserError):
    """A training step produced a NaN or infinite loss or gradient (policy `stop`)."""


class StopRequest:
    """Records the first SIGINT/SIGTERM instead of dying, so the loop can stop at a step boundary.

    Outside the main thread (where Python cannot install handlers) it installs nothing and
    never reports a request; the default signal behaviour stays.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls) -> "StopRequest":
        stop = cls()
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                stop._previous[sig] = signal.signal(sig, stop._handle)
        return stop

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        # A second signal of the same kind takes the old road (KeyboardInterrupt / terminate).
        previous = self._previous.get(signum)
        if previous is not None:
            signal.signal(signum, previous)

    def interrupted(self, step: int, run_dir: Path) -> Interrupted:
        assert self.signum is not None
        return Interrupted(self.signum, step, run_dir)

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
        self._previous.clear()


def nonfinite_reason(loss: float, grad_norm: float | torch.Tensor) -> str | None:
    """Why a step must not update the weights ("the loss is nan", ...), or None when both are finite."""
    loss, grad_norm = float(loss), float(grad_norm)
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None


# Weights beyond this are diverged: fp32 products of two of them already overflow.
WEIGHT_LIMIT = 2.0 ** 50


def apply_update(step: int, optimizer: torch.optim.Optimizer, named: list[tuple[str, Any]], lr: float,
                 run_dir: Path, any_rank: Any = None) -> None:
    """`optimizer.step()`, then make sure the weights are finite and at most WEIGHT_LIMIT in magnitude;
    else a `NonFiniteError`.

    A finite loss and gradient can still give non-finite (or diverged) weights when the step size
    is absurd (lr * gradient overflows fp32), and an lr beyond fp32 overflows inside the optimizer.
    Neither can be undone or skipped, so both stop the run under either policy; nothing of this
    step is saved. `any_rank(flag) -> flag`: the largest flag over processes (None at world size 1).
    """
    try:
        optimizer.step()
        bad = next((f"('{name}')" for name, p in named if not _local(p).numel() == 0
                    and not float(_local(p).detach().abs().amax()) <= WEIGHT_LIMIT), None)  # NaN fails <= too
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        bad = f"(the optimizer's own arithmetic: {str(exc).splitlines()[0]})"
    flag = 1.0 if bad is not None else 0.0
    if any_rank is not None:
        flag = any_rank(flag)
    if flag:
        raise NonFiniteError(
            f"step {step}: the update with optim.lr={lr:g} made the weights non-finite or diverged "
            f"{bad or '(on another process)'}; "
            f"nothing after the last good checkpoint ({last_checkpoint_name(run_dir)}) was saved; lower optim.lr, "
            f"then resume with: opdlab distill --resume {run_dir}"
        )


def _local(p: Any) -> torch.Tensor:
    """This process's part of a parameter (a DTensor's local shard under FSDP2)."""
    return p.to_local() if hasattr(p, "to_local") else p


def last_checkpoint_name(run_dir: Path) -> str:
    """`checkpoints/step-N` of the newest complete checkpoint, or 'none' (for messages)."""
    found = list_checkpoints(run_dir)
    return f"{found[-1][1].relative_to(run_dir)}" if found else "none (nothing to resume from)"


def skip_nonfinite(step: int, loss: float, grad_norm: float | torch.Tensor, policy: str, run_dir: Path) -> bool:
    """True when this step's batch must be skipped; raises `NonFiniteError` under policy `stop`.

    Call after backward (and clipping) and before `optimizer.step()`.
    """
    reason = nonfinite_reason(loss, grad_norm)
    if reason is None:
        return False
    if policy == "skip":
        return True
    raise NonFiniteError(
        f"step {step}: {reason}; the update was not applied and nothing after the last good checkpoint "
        f"({last_checkpoint_name(run_dir)}) was saved; lower optim.lr or check the data, then "
        f"resume with: opdlab distill --resume {run_dir} (add --set run.on_nonfinite=skip to drop such batches)"
    )
