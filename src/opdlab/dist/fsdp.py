"""FSDP2 glue: shard the student (and optionally the teacher), shard masks like their parameters, gather full weights.

    student = shard_model(ctx, student)                 # fully_shard every decoder layer, then the root
    masks = shard_masks(masks, named_params)            # DTensor masks with their parameters' placements
    state = full_state_dict(student)                    # a collective: rank 0 gets full CPU tensors, others {}

Every function is the identity at world size 1, so the single-process trainer runs unchanged.

Choices, and why:
1. The unit of sharding is the decoder layer (the classes HF lists in `_no_split_modules`), then
   the root (embeddings, final norm, LM head): one all-gather per layer, as FSDP2 recommends.
2. Gradients are *summed* across ranks (`set_gradient_divide_factor(1.0)`), not averaged: each
   rank's loss is already divided by the completion tokens of the whole global step, so the sum
   is exactly the single-process gradient of the same global batch.
3. A sharded teacher (`model.shard_teacher`) is wrapped the same way and only ever runs forward
   (under `inference_mode`); each forward all-gathers one layer at a time, so a teacher larger
   than one device fits at the price of that communication.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from opdlab.dist.runtime import DistContext
from opdlab.errors import UserError


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of an HF model: modules whose class is named in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:
        # Fall back to the largest ModuleList (the layer stack of most architectures).
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    return layers


def shard_model(ctx: DistContext, model: Any, *, sum_gradients: bool = True) -> Any:
    """`fully_shard` each decoder layer, then the root, over `ctx.mesh`; the model itself at world 1.

    The model keeps its class (FSDP2 swaps in a subclass) and parameter names; parameters become
    DTensors sharded on dim 0. `sum_gradients=False` keeps FSDP's default average (unused here).
    """
    if not ctx.distributed:
        return model
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    if sum_gradients:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                # Plain SUM collectives: gloo has no PREMUL_SUM, and a factor of 1 needs no scaling.
                module.set_force_sum_reduction_for_comms(True)
    return model


def shard_masks(masks: dict[str, torch.Tensor], named_params: Iterable[tuple[str, Any]]) -> dict[str, torch.Tensor]:
    """Each full bool mask turned into a DTensor laid out like its (DTensor) parameter.

    Every rank holds the full mask file already, so each keeps its own chunk without
    communication (`src_data_rank=None`). Plain parameters (world size 1) keep plain masks.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    out: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        if name not in masks:
            continue
        m = masks[name]
        if isinstance(p, DTensor):
            m = distribute_tensor(m.to(p.to_local().device), p.device_mesh, p.placements, src_data_rank=None)
            if tuple(m.to_local().shape) != tuple(p.to_local().shape):
                raise UserError(f"mask for '{name}': local shard {list(m.to_local().shape)} does not match the "
                                f"parameter's {list(p.to_local().shape)}")
        out[name] = m
    return out


def reshard(model: Any) -> Any:
    """Put every FSDP unit back to its sharded parameters (no-op for a plain model); returns the model.

    FSDP2 leaves the root unit unsharded after a forward without backward (generation and
    evaluation end that way), and `named_parameters()` then yields plain full tensors instead of
    the DTensors the optimizer holds. Checkpoint code calls this first.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def full_state_dict(model: Any, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors by parameter/buffer name; a collective under FSDP.

    Default: CPU tensors on rank 0 and `{}` on the others (for writing files). `everywhere=True`:
    every rank gets them on its device, e.g. to refresh a per-rank vLLM engine.
    """
    from torch.distributed.tensor import DTensor

    reshard(model)
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return {k: v.detach() if everywhere else v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    return {k: v.detach() for k, v in get_model_state_dict(model, options=options).items()}


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's shard of a DTensor (parameter, gradient, mask, optimizer state); a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t
