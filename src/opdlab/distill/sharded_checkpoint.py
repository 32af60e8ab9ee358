"""Checkpoints under torchrun: sharded DCP trainer state for resume, consolidated HF safetensors to read.

    save_checkpoint(ctx, run_dir, step, model, tok, opt, sched, "bf16", state, keep=2)   # every rank calls
    step = load_checkpoint(ctx, folder, model, opt, sched, masks)["step"]               # any world size
    save_final(ctx, run_dir, model, tok, "bf16")                                         # rank 0 writes final/

At world size 1 each function hands over to `opdlab.distill.checkpoint` (the single-process
format, unchanged). With more ranks a step checkpoint is::

    checkpoints/step-N/                   HF folder (rank 0, full weights in the storage dtype)
    checkpoints/step-N/trainer_state/
        dcp/                              torch.distributed.checkpoint: "model.<name>" (fp32 master
                                          weights) and "optim.<name>.<key>" (optimizer state), sharded
        rng-rank<R>.pt                    each rank's RNG state
        scheduler.pt  param_groups.json   schedule state; the groups' current lr
        state.json                        step, data position, parameter names, world size (written last)

Optimizer state is stored *dense*, shaped like its parameter, whatever the optimizer keeps in
memory: the masked optimizers' compact vectors over local masked coordinates are scattered into
zeros for the save (transiently, one parameter-sized buffer per state tensor) and gathered back on
load. That makes every tensor reshardable, so a checkpoint resumes on any number of processes —
including 1, where DCP reads without a process group — and a single-process checkpoint resumes
on N processes (each rank keeps its chunk of the full tensors).

RNG: restored per rank when the world size is unchanged; otherwise rank r takes the saved rank
r's state when there is one, else rank 0's. Training draws nothing from these streams — rollouts
are seeded per completion (`opdlab.distill.sampling`) and evaluation is greedy — so a resume on a
different world size sees the same samples; what is *not* guaranteed across world sizes is
bit-identity, because the gradient's reduction order changes with the number of ranks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from opdlab.dist.fsdp import full_state_dict, local, reshard
from opdlab.dist.runtime import DistContext
from opdlab.distill import checkpoint as ckpt
from opdlab.errors import UserError
from opdlab.fileio import atomic_path
from opdlab.subnet.optimizers import mask_to_index

# Optimizer state tensors shaped like their parameter, per optimizer family.
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_SGD_KEYS = ("momentum_buffer",)


# ----------------------------------------------------------------------------- optimizer state <-> dense


def _state_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    if "betas" in optimizer.param_groups[0]:
        return _ADAM_KEYS
    return _SGD_KEYS if optimizer.param_groups[0].get("momentum", 0) else ()


def _is_masked(optimizer: torch.optim.Optimizer) -> bool:
    return hasattr(optimizer, "mask_info")


def _like_param(local_dense: torch.Tensor, p: Any) -> torch.Tensor:
    """A local dense shard as a DTensor laid out like `p` (the shard itself for a plain parameter)."""
    if not hasattr(p, "device_mesh"):
        return local_dense
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_dense, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def dense_optimizer_state(
    ctx: DistContext, optimizer: torch.optim.Optimizer, named: list[tuple[str, Any]]
) -> dict[str, torch.Tensor]:
    """Optimizer state as "optim.<name>.<key>" -> tensor shaped (and sharded) like the parameter.

    "optim.<name>.step" is a float64 scalar. A parameter is included when any rank holds state
    for it (a rank whose shard of the mask is empty has none and contributes zeros).
    """
    keys, masked = _state_keys(optimizer), _is_masked(optimizer)
    steps = [float(int(optimizer.state[p]["step"])) if optimizer.state.get(p) else 0.0 for _, p in named]
    steps = ctx.all_max(*steps)
    out: dict[str, torch.Tensor] = {}
    for (name, p), step in zip(named, steps):
        if step == 0:
            continue
        out[f"optim.{name}.step"] = torch.tensor(step, dtype=torch.float64)
        st = optimizer.state.get(p) or {}
        for key in keys:
            if not masked and key in st:
                out[f"optim.{name}.{key}"] = st[key]
                continue
            dense = torch.zeros_like(local(p), dtype=p.dtype)
            if key in st:
                idx = optimizer.mask_info(p)[0]  # type: ignore[attr-defined]
                if idx is None:
                    dense.view(-1).copy_(st[key])
                else:
                    dense.view(-1).scatter_(0, idx.long(), st[key])
            out[f"optim.{name}.{key}"] = _like_param(dense, p)
    return out


def dense_templates(optimizer: torch.optim.Optimizer, named: list[tuple[str, Any]], saved_keys: set[str]) -> dict[str, torch.Tensor]:
    """Empty tensors to load the saved "optim.*" entries into (DCP loads in place)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in named:
        if f"optim.{name}.step" not in saved_keys:
            continue
        out[f"optim.{name}.step"] = torch.zeros((), dtype=torch.float64)
        for key in _state_keys(optimizer):
            if f"optim.{name}.{key}" in saved_keys:
                out[f"optim.{name}.{key}"] = _like_param(torch.zeros_like(local(p), dtype=p.dtype), p)
    return out


def load_dense_optimizer_state(
    optimizer: torch.optim.Optimizer, named: list[tuple[str, Any]], dense: dict[str, torch.Tensor]
) -> None:
    """Set the optimizer's state from `dense` (as `dense_optimizer_state` makes it, local shards)."""
    masked = _is_masked(optimizer)
    optimizer.state.clear()
    for name, p in named:
        step_key = f"optim.{name}.step"
        if step_key not in dense:
            continue
        step = int(float(dense[step_key]))
        keys = [k for k in _state_keys(optimizer) if f"optim.{name}.{k}" in dense]
        if masked:
            idx, nnz, checksum = optimizer.mask_info(p)  # type: ignore[attr-defined]
            if nnz == 0:
                continue  # this rank holds no masked coordinate of p: no state, as in a fresh run
            st: dict[str, Any] = {"step": step, "nnz": nnz, "index_checksum": checksum}
            for key in keys:
                flat = local(dense[f"optim.{name}.{key}"]).reshape(-1)
                st[key] = (flat if idx is None else flat.index_select(0, idx)).to(p.dtype).clone()
        else:
            # torch keeps `step` as a float32 tensor (exact for integers below 2**24).
            st = {"step": torch.tensor(float(step), dtype=torch.float32)}
            for key in keys:
                st[key] = dense[f"optim.{name}.{key}"]
        optimizer.state[p] = st


# ----------------------------------------------------------------------------- save


def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, float]]:
    """The schedule-driven numbers of each param group (the scheduler rewrites `lr` every step)."""
    return [{k: float(g[k]) for k in ("lr", "initial_lr") if k in g} for g in optimizer.param_groups]


def save_checkpoint(
    ctx: DistContext, run_dir: Path, step: int, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer,
    scheduler: Any, save_dtype: str, state: dict[str, Any], keep: int,
) -> Path:
    """Write `checkpoints/step-{step}/` (every rank calls this); the single-process format at world 1.

    Atomic as a whole: ranks fill a `.step-N.tmp-dist` sibling, rank 0 renames it once all are done.
    """
    if not ctx.distributed:
        return ckpt.save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, save_dtype, state, keep)
    import torch.distributed.checkpoint as dcp

    target = run_dir / "checkpoints" / f"step-{step}"
    partial = target.with_name(f".{target.name}.tmp-dist")  # a stale one is swept on resume
    if ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "trainer_state").mkdir(parents=True)
    ctx.barrier()
    named = list(reshard(model).named_parameters())
    full = full_state_dict(model)  # collective; rank 0 holds the tensors
    if ctx.is_main:
        ckpt.save_model(partial, model, tokenizer, ckpt.STORAGE_DTYPES["bf16" if save_dtype == "both" else save_dtype], full)
    del full
    sharded = {f"model.{name}": p.detach() for name, p in named}
    sharded.update(dense_optimizer_state(ctx, optimizer, named))
    dcp.save(sharded, checkpoint_id=str(partial / "trainer_state" / "dcp"))
    trainer = partial / "trainer_state"
    torch.save(ckpt.rng_state(), trainer / f"rng-rank{ctx.rank}.pt")
    ctx.barrier()
    if ctx.is_main:
        torch.save(scheduler.state_dict(), trainer / "scheduler.pt")
        (trainer / "param_groups.json").write_text(json.dumps(_group_settings(optimizer)) + "\n", encoding="utf-8")
        meta = {"step": step, **state, "world_size": ctx.world_size, "format": "dcp"}
        (trainer / "state.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
        ckpt.prune_checkpoints(run_dir, keep)
    ctx.barrier()
    return target


def save_final(ctx: DistContext, run_dir: Path, model: Any, tokenizer: Any, save_dtype: str) -> Path:
    """`final/` (and `final-fp32/` with save_dtype=both) from the full weights; rank 0 writes."""
    if not ctx.distributed:
        return ckpt.save_final(run_dir, model, tokenizer, save_dtype)
    full = full_state_dict(model)
    if ctx.is_main:
        if save_dtype == "both":
            with atomic_path(run_dir / "final-fp32") as tmp:
                ckpt.save_model(tmp, model, tokenizer, torch.float32, full)
        with atomic_path(run_dir / "final") as tmp:
            ckpt.save_model(tmp, model, tokenizer, ckpt.STORAGE_DTYPES["bf16" if save_dtype == "both" else save_dtype], full)
    ctx.barrier()
    return run_dir / "final"


# ----------------------------------------------------------------------------- load


def is_sharded(folder: Path) -> bool:
    """True for a checkpoint written by several processes (DCP trainer state)."""
    return (folder / "trainer_state" / "dcp").is_dir()


def _local_chunk(full: torch.Tensor, p: Any) -> torch.Tensor:
    """This rank's chunk of a full tensor, laid out like `p` (no communication)."""
    if not hasattr(p, "device_mesh"):
        return full.to(p.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(local(p).device), p.device_mesh, p.placements, src_data_rank=None)


def _read_single_process(folder: Path, optimizer: torch.optim.Optimizer, named: list[tuple[str, Any]],
                         masks: dict[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """A single-process checkpoint as {"model.<name>", "optim.<name>.<key>"} chunks for this rank."""
    trainer = folder / "trainer_state"
    state = json.loads((trainer / "state.json").read_text(encoding="utf-8"))
    master = load_file(str(trainer / "master.safetensors"))
    saved = torch.load(trainer / "optimizer.pt", weights_only=True)
    params = dict(named)
    out = {f"model.{name}": _local_chunk(master[name], p) for name, p in named if name in master}
    for i, st in saved["state"].items():
        name = state["param_names"][int(i)]
        p = params[name]
        out[f"optim.{name}.step"] = torch.tensor(float(st["step"]), dtype=torch.float64)
        full_idx = None
        if _is_masked(optimizer) and masks is not None:
            m = masks[name]
            full_idx = mask_to_index(m.full_tensor() if hasattr(m, "full_tensor") else m)
        for key in _state_keys(optimizer):
            if key not in st:
                continue
            value = st[key]
            if _is_masked(optimizer):  # compact over the full tensor's masked coordinates
                dense = torch.zeros(p.shape, dtype=p.dtype)
                if full_idx is None:
                    dense.view(-1).copy_(value)
                else:
                    dense.view(-1).scatter_(0, full_idx.long(), value)
                value = dense
            out[f"optim.{name}.{key}"] = _local_chunk(value, p)
    return out, [{k: g[k] for k in ("lr", "initial_lr") if k in g} for g in saved["param_groups"]]


def load_checkpoint(
    ctx: DistContext, folder: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
    masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and RNG from a checkpoint of any world size; return state.json.

    `masks` (the run's masks, sharded like the parameters) are needed only to spread a
    single-process masked optimizer's compact state over N ranks.
    """
    sharded = is_sharded(folder)
    if not ctx.distributed and not sharded:
        return ckpt.load_checkpoint(folder, model, optimizer, scheduler)
    trainer = folder / "trainer_state"
    named = list(reshard(model).named_parameters())
    try:
        state = json.loads((trainer / "state.json").read_text(encoding="utf-8"))
        if sharded:
            import torch.distributed.checkpoint as dcp

            path = str(trainer / "dcp")
            saved_keys = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
            missing = [n for n, _ in named if f"model.{n}" not in saved_keys]
            if missing:
                raise UserError(f"{folder}: the checkpoint has no tensor '{missing[0]}'; resume with the run's own student")
            values = {f"model.{name}": p.detach() for name, p in named}  # DCP loads in place
            values.update(dense_templates(optimizer, named, saved_keys))
            dcp.load(values, checkpoint_id=path)
            groups = json.loads((trainer / "param_groups.json").read_text(encoding="utf-8"))
            saved_world = int(state.get("world_size", 1))
            rng_file = trainer / f"rng-rank{ctx.rank if ctx.rank < saved_world else 0}.pt"
        else:
            values, groups = _read_single_process(folder, optimizer, named, masks)
            rng_file = trainer / "rng.pt"
        sched_state = torch.load(trainer / "scheduler.pt", weights_only=True)
        rng = torch.load(rng_file, weights_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder}: cannot read the checkpoint's trainer state ({str(exc).splitlines()[0]}); "
                        "delete this checkpoint folder to resume from an older one") from None
    with torch.no_grad():
        for name, p in named:
            source = local(values[f"model.{name}"])
            if source.data_ptr() != local(p).data_ptr():  # DCP already loaded in place
                local(p).copy_(source)
    load_dense_optimizer_state(optimizer, named, values)
    for group, saved in zip(optimizer.param_groups, groups):
        group.update(saved)
    scheduler.load_state_dict(sched_state)
    ckpt.set_rng_state(rng)
    return state
