"""Update telemetry: how far the student in memory has moved from its source on disk, during training.

    tracker = UpdateTracker(models.student_path, named_params, masks_dir=run_dir / "masks")
    row.update(tracker.measure(step))    # {"update/changed_fraction": 0.031, "update/changed_fraction/mlp": ...}

Every measurement streams the source one tensor at a time from its safetensors files (memory-
mapped by safetensors; never a second model in memory) and compares it with the parameters in
memory, with `opdlab analyze`'s definitions in its default dtype, so a row at step N equals what
`opdlab analyze SOURCE RUN` reports on a bf16 checkpoint of step N:

  update/changed_fraction[/BLOCK]   coordinates whose bf16 value changed: |bf16(W) - bf16(W0)| > 0,
                                    Δ in fp32 (analysis' 1 - sparsity), whole model and per block
  update/relative_norm[/BLOCK]      ‖Δ‖_F / ‖W0‖_F of the bf16 casts (analysis' relative_update_norm)
  update/jaccard_previous[/BLOCK]   |U_now ∩ U_prev| / |U_now ∪ U_prev| of the changed masks against the
                                    previous measurement (absent at the first one)

Blocks are the analysis' (attention, mlp, embedding, norm, vision, projector, other). The previous
mask is kept bit-packed (1 bit per coordinate). With `masks_dir`, each measurement also writes
`masks_dir/step-N.safetensors`: that mask, bit-packed (`masks.save_packed_mask`), usable
directly as `--mask`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

from opdlab.analysis.aggregate import classify
from opdlab.analysis.metrics_sparsity import changed_mask, update
from opdlab.analysis.pairs import Checkpoint, canonical_name
from opdlab.errors import UserError
from opdlab.subnet.masks import load_mask, pack_bits, save_packed_mask, unpack_bits

ANALYSIS_DTYPE = torch.bfloat16
COUNTS = ("numel", "changed", "delta_sq", "source_sq", "both", "either")


def tensor_counts(source: torch.Tensor, current: torch.Tensor,
                  previous: torch.Tensor | None) -> tuple[dict[str, float], torch.Tensor]:
    """Additive counts of one tensor, and its changed mask (bool, the tensor's shape).

    source, current: same shape, already in the analysis dtype. previous: the changed mask of the
    last measurement (bool, same shape) or None. Counts: numel, changed, delta_sq (ΣΔ², fp64),
    source_sq (ΣW0², fp64) and, with `previous`, both (|U ∩ U_prev|) and either (|U ∪ U_prev|).
    """
    changed = changed_mask(source, current, 0.0)
    delta = update(source, current)
    counts = {"numel": float(changed.numel()), "changed": float(changed.sum()),
              "delta_sq": float(delta.double().pow(2).sum()), "source_sq": float(source.double().pow(2).sum())}
    if previous is not None:
        counts["both"] = float((changed & previous).sum())
        counts["either"] = float((changed | previous).sum())
    return counts, changed


def rows_from_counts(groups: dict[str, dict[str, float]]) -> dict[str, float]:
    """metrics.jsonl keys from summed counts per block ("" = the whole model)."""
    row: dict[str, float] = {}
    for block, c in groups.items():
        suffix = f"/{block}" if block else ""
        row[f"update/changed_fraction{suffix}"] = c["changed"] / c["numel"] if c["numel"] else math.nan
        row[f"update/relative_norm{suffix}"] = math.sqrt(c["delta_sq"] / c["source_sq"]) if c["source_sq"] > 0 else math.nan
        if "either" in c:
            row[f"update/jaccard_previous{suffix}"] = c["both"] / c["either"] if c["either"] else 1.0
    return row


class UpdateTracker:
    """Measures the update of `named_params` against the source checkpoint at `source` (module docs)."""

    def __init__(self, source: str | Path, named_params: Iterable[tuple[str, torch.nn.Parameter]],
                 masks_dir: Path | None = None) -> None:
        self.source = Checkpoint(source)
        self.params = list(named_params)
        self.masks_dir = masks_dir
        for name, p in self.params:
            if hasattr(p, "to_local"):
                raise UserError("run.track_update_every: not available under FSDP2 (sharded parameters); "
                                "set it to 0, or train on one process")
            canon = canonical_name(name)
            if canon not in self.source:
                raise UserError(f"{self.source.path}: run.track_update_every needs the student's source weights, and "
                                f"tensor '{canon}' is not in them; set run.track_update_every=0")
            if tuple(self.source.shape(canon)) != tuple(p.shape):
                raise UserError(f"{self.source.path}: tensor '{canon}' has shape {list(self.source.shape(canon))} "
                                f"but the student's is {list(p.shape)}; set run.track_update_every=0")
        self._previous: dict[str, torch.Tensor] | None = None  # canonical name -> packed changed mask

    def resume_from(self, mask_file: Path) -> None:
        """Take the changed masks of an earlier measurement (a snapshot file) as the previous ones."""
        masks, _ = load_mask(mask_file)
        self._previous = {name: pack_bits(m) for name, m in masks.items()}

    @torch.no_grad()
    def measure(self, step: int) -> dict[str, float]:
        """One measurement after `step`: the `update/...` metrics (and the mask snapshot, when on)."""
        groups: dict[str, dict[str, float]] = {}
        packed: dict[str, torch.Tensor] = {}
        shapes: dict[str, list[int]] = {}
        for name, p in self.params:
            canon = canonical_name(name)
            current = p.detach().to("cpu", ANALYSIS_DTYPE)
            source = self.source.get(canon, ANALYSIS_DTYPE)
            previous = None
            if self._previous is not None and canon in self._previous:
                previous = unpack_bits(self._previous[canon], current.numel()).view(current.shape)
            counts, changed = tensor_counts(source, current, previous)
            for block in ("", classify(canon)[2]):
                acc = groups.setdefault(block, {})
                for key, value in counts.items():
                    acc[key] = acc.get(key, 0.0) + value
            packed[canon] = pack_bits(changed)
            shapes[canon] = list(changed.shape)
        row = rows_from_counts(groups)
        if self.masks_dir is not None:
            meta = {"kind": "update", "density": repr(row["update/changed_fraction"]), "source": str(self.source.path),
                    "step": str(step), "atol": "0.0", "dtype": "bf16"}
            save_packed_mask(self.masks_dir / f"step-{step}.safetensors", packed, shapes, meta)
        self._previous = packed
        return row
