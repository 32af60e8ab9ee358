"""Process-group runtime: world size 1 without torchrun, FSDP2-ready ranks under it.

    ctx = init_from_env("cpu")       # idempotent; gloo on CPU, nccl on CUDA; world 1 outside torchrun
    first, mine = ctx.shard(examples)  # this rank's contiguous share of a step's prompts
    loss, kl = ctx.all_sum(loss, kl)   # sums over ranks (returned unchanged at world size 1)
    if ctx.is_main: write_json(...)    # files and progress are rank 0's job

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; with WORLD_SIZE
absent or 1 nothing is initialised and every helper is the identity, so a single-process run
executes the same code with no communication and bit-identical numbers.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

from opdlab.errors import UserError

T = TypeVar("T")


@dataclass
class DistContext:
    """Where this process stands: rank, world size, its device and (world > 1) the 1-D device mesh."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_type: str = "cpu"
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> tuple[int, list[T]]:
        """(index of the first item, this rank's items): contiguous equal shares of `items`.

        Equal shares keep every rank's number of forward passes the same, which FSDP's
        collectives need; `check_divisible` rejects a batch that does not split evenly.
        """
        per = len(items) // self.world_size
        first = self.rank * per
        return first, list(items[first:first + per])

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_sum(self, *values: float) -> list[float]:
        """Each value summed over ranks (one all-reduce in float64); the values as given at world 1."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def all_max(self, *values: float) -> list[float]:
        """Each value's maximum over ranks (wall times: the step waits for the slowest rank)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [float(v) for v in t.cpu()]

    def mean(self, values: torch.Tensor) -> float:
        """Mean of `values` over all ranks' elements; `float(values.mean())` itself at world 1."""
        if not self.distributed:
            return float(values.mean())
        total, count = self.all_sum(float(values.double().sum()), float(values.numel()))
        return total / count

    def agree_stop(self, stop: Any) -> bool:
        """True when any rank's `StopRequest` (distill/guards.py) saw a signal; adopts that signal here.

        Signals reach ranks at slightly different times; deciding together keeps every rank
        entering (or skipping) the checkpoint collective at the same step.
        """
        if not self.distributed:
            return bool(stop.requested)
        signum = int(self.all_max(float(stop.signum or 0))[0])
        if signum and stop.signum is None:
            stop.signum = signum
        return signum > 0

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank; [obj] at world size 1."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and hand its result (or its UserError) to every rank.

        For work with a side effect that must happen once (making the run folder): the other
        ranks wait, then raise the same one-line error instead of hanging in a later collective.
        """
        if not self.distributed:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except UserError as exc:
                box[0] = ("error", str(exc))
        torch.distributed.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise UserError(value)
        return value

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device_type == "cuda" else torch.device("cpu")


_CONTEXT: DistContext | None = None


def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_from_env(device: str = "cpu", field: str = "model.device") -> DistContext:
    """The process's context; the first call under torchrun (WORLD_SIZE > 1) joins the process group.

    `device` is the config's `field` (`model.device` for training, `device` for analysis):
    "cpu" -> gloo and a CPU mesh; "cuda" -> nccl, one GPU per process (`cuda:LOCAL_RANK` becomes
    the current device, so "cuda" means it). A per-process index such as "cuda:1" is refused
    under torchrun: the launcher assigns GPUs.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = env_world_size()
    device_type = torch.device(device).type
    if world <= 1:
        _CONTEXT = DistContext(device_type=device_type)
        return _CONTEXT
    if device_type not in ("cpu", "cuda"):
        raise UserError(f"{field} '{device}': multi-process runs use cpu (gloo) or cuda (nccl)")
    if device_type == "cuda" and torch.device(device).index is not None:
        raise UserError(f"{field} '{device}': under torchrun pass plain 'cuda'; each process takes cuda:LOCAL_RANK")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        atexit.register(_shutdown)
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    _CONTEXT = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device_type, mesh)
    return _CONTEXT


def _shutdown() -> None:
    """Leave the process group at exit, together: a rank that tears gloo down while a peer still
    talks to it aborts ("terminate called without an active exception"). The barrier is bounded
    so a rank that failed alone does not wait forever for peers that are gone."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    except RuntimeError:
        pass
    dist.destroy_process_group()


def check_divisible(ctx: DistContext, prompts_per_step: int) -> None:
    """Every rank must get the same number of prompts (FSDP needs the same passes on every rank)."""
    if prompts_per_step % ctx.world_size:
        raise UserError(f"config field 'rollout.prompts_per_step' ({prompts_per_step}) must be a multiple of the "
                        f"number of processes ({ctx.world_size}); each process takes an equal share")


def scalar(x: Any) -> float:
    """A Python float from a tensor, DTensor (e.g. FSDP's global grad norm) or number."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


class NullLog:
    """The metrics log of ranks other than 0: writes nothing, shows no progress."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
