"""Masks for early subnetwork discovery: found before the full run ends, at a given per-tensor density.

    target = extract_mask(source, full_run)                     # the final mask: its density is the budget
    early = match_density(snapshot_at_step_4, target, seed=0)   # what a run had changed after 4 steps
    zero_cost = lowest_magnitude_like(source, target)           # from the source weights alone
    overlap, chance = overlap_with(early, target)               # share of `early` inside `target`, and by chance

Every arm of the experiment (recipes/mask_discovery.py) trains exactly as many coordinates per
tensor as the final mask holds, so only *which* coordinates differ between arms.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opdlab.analysis.pairs import Checkpoint
from opdlab.errors import UserError
from opdlab.subnet.masks import MaskDict, sample_indices, tensor_generator


def match_density(found: MaskDict, like: MaskDict, seed: int = 0) -> MaskDict:
    """`found` resized, tensor by tensor, to the count of `like`.

    A tensor of `found` holding more coordinates than `like`'s keeps a uniform random subset of
    them; one holding fewer keeps all of them and is filled up with coordinates drawn uniformly from
    the rest. Draws are seeded from (seed, tensor name). Tensors of `like` missing from `found`
    are an error naming the tensor (the two masks must come from the same model).
    """
    out: MaskDict = {}
    for name, target in like.items():
        if name not in found:
            raise UserError(f"mask tensor '{name}' is missing from the early mask; was it taken from the same model?")
        have = found[name].reshape(-1)
        if have.numel() != target.numel():
            raise UserError(f"mask tensor '{name}': {have.numel()} coordinates in the early mask, "
                            f"{target.numel()} in the final one; were they taken from the same model?")
        k, gen = int(target.sum()), tensor_generator(seed, name)
        inside = have.nonzero().flatten()
        chosen = torch.zeros(have.numel(), dtype=torch.bool)
        if inside.numel() >= k:
            chosen[inside[sample_indices(inside.numel(), k, gen)]] = True
        else:
            chosen[inside] = True
            outside = (~have).nonzero().flatten()
            chosen[outside[sample_indices(outside.numel(), k - inside.numel(), gen)]] = True
        out[name] = chosen.view(target.shape)
    return out


def lowest_magnitude_like(source: str | Path | Checkpoint, like: MaskDict) -> MaskDict:
    """The coordinates of smallest |W| in the source, as many per tensor as `like` holds.

    A mask that costs no training at all: the study finds OPD's update falls disproportionately
    on near-zero source weights. Ties at the cut are broken by position (torch.topk).
    """
    ck = source if isinstance(source, Checkpoint) else Checkpoint(source, prefer_fp32=True)
    out: MaskDict = {}
    for name, target in like.items():
        if name not in ck:
            raise UserError(f"{ck.path}: mask tensor '{name}' is not in the source; was the mask made for this model?")
        w = ck.get(name, torch.float32).reshape(-1)
        if w.numel() != target.numel():
            raise UserError(f"{ck.path}: tensor '{name}' has {w.numel()} coordinates, the mask {target.numel()}")
        chosen = torch.zeros(w.numel(), dtype=torch.bool)
        k = int(target.sum())
        if k:
            chosen[torch.topk(w.abs(), k, largest=False, sorted=False).indices] = True
        out[name] = chosen.view(target.shape)
    return out


def overlap_with(mask: MaskDict, final: MaskDict) -> tuple[float, float]:
    """(share of `mask`'s coordinates inside `final`, the same share expected by chance).

    Chance places each tensor's coordinates of `mask` uniformly at random, so a tensor contributes
    |mask_t| x density(final_t); both shares are over all tensors (coordinate-weighted). A share
    equal to chance means the mask knew nothing of where the final update would land.
    """
    hit = chance = total = 0.0
    for name, m in mask.items():
        f = final[name]
        k = float(m.sum())
        hit += float((m & f).sum())
        chance += k * float(f.sum()) / max(f.numel(), 1)
        total += k
    if total == 0:
        return float("nan"), float("nan")
    return hit / total, chance / total
