"""Measurements the subnetwork and optimizer experiments report (pure, from files or state dicts).

- `second_moment_spread`: the study's proposed reason AdamW beats SGD under OPD is that dense
  teacher supervision keeps per-coordinate gradient scales heterogeneous. Adam's second-moment
  estimate v tracks the squared gradient per coordinate, so the spread of sqrt(v) inside each
  tensor (coefficient of variation, std / mean) is a direct read-out of that heterogeneity.
- `weight_closeness`: how close a retrained subnetwork ends up to the full run's weights.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from opdlab.analysis.pairs import Checkpoint, match_tensors


def second_moment_spread(optimizer_state: dict, names: list[str] | None = None) -> dict:
    """Coefficient of variation of sqrt(exp_avg_sq) within each tensor of an Adam state dict.

    `optimizer_state` is `torch.optim.AdamW(...).state_dict()`; `names[i]` names parameter i in
    the order the optimizer was given them. Returns {"per_tensor": {name: cv}, "median": m,
    "mean": m, "num_tensors": n}; tensors with fewer than 2 coordinates or v == 0 are skipped.
    """
    per_tensor: dict[str, float] = {}
    for index, entry in optimizer_state.get("state", {}).items():
        v = entry.get("exp_avg_sq")
        if v is None or v.numel() < 2:
            continue
        root = v.detach().float().clamp_min(0).sqrt().flatten()
        mean = root.mean().item()
        if mean <= 0 or not math.isfinite(mean):
            continue
        name = names[int(index)] if names is not None and int(index) < len(names) else f"param{index}"
        per_tensor[name] = root.std(unbiased=False).item() / mean
    values = list(per_tensor.values())
    return {
        "per_tensor": per_tensor,
        "median": statistics.median(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
        "num_tensors": len(values),
    }


def weight_closeness(source: str | Path, full: str | Path, other: str | Path, atol: float = 1e-5) -> dict:
    """How close `other`'s weights are to `full`'s, both trained from `source` (fp32 compare).

    Returns the fraction of coordinates with |other - full| <= atol, the relative distance
    ||other - full|| / ||full - source|| (0 = reached the full run, 1 = as far as the source
    was), and ||other - source|| / ||full - source|| (how much of the full update it made).
    """
    src, a, b = Checkpoint(source, prefer_fp32=True), Checkpoint(full, prefer_fp32=True), Checkpoint(other, prefer_fp32=True)
    names = match_tensors(src, a).names
    names = [n for n in names if n in b and b.shape(n) == a.shape(n)]
    equal = total = 0
    dist_sq = update_sq = other_update_sq = 0.0
    for name in names:
        w0 = src.get(name, torch.float32)
        wa = a.get(name, torch.float32)
        wb = b.get(name, torch.float32)
        diff = wb - wa
        equal += int((diff.abs() <= atol).sum())
        total += diff.numel()
        dist_sq += float(diff.double().pow(2).sum())
        update_sq += float((wa - w0).double().pow(2).sum())
        other_update_sq += float((wb - w0).double().pow(2).sum())
    update = math.sqrt(update_sq)
    return {
        "frac_equal_1e-5" if atol == 1e-5 else f"frac_equal_{atol:g}": equal / max(total, 1),
        "relative_distance": math.sqrt(dist_sq) / update if update > 0 else float("nan"),
        "update_norm_ratio": math.sqrt(other_update_sq) / update if update > 0 else float("nan"),
        "num_params": total,
    }
