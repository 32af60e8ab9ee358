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

import numpy as np
import torch

from opdlab.analysis.aggregate import classify
from opdlab.analysis.metrics_sparsity import changed_mask, update
from opdlab.analysis.pairs import Checkpoint, canonical_name
from opdlab.errors import UserError
from opdlab.subnet.masks import load_mask, pack_bits, save_packed_mask

ANALYSIS_DTYPE = torch.bfloat16
COUNTS = ("numel", "changed", "delta_sq", "source_sq", "both", "either")
BLOCK = 1 << 20  # coordinates per streamed block (a multiple of 8, so blocks pack into whole bytes)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


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


def streamed_counts(source: torch.Tensor, current: torch.Tensor, previous_packed: torch.Tensor | None,
                    source_sq: float | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """`tensor_counts` in blocks of BLOCK coordinates, with the changed mask returned bit-packed.

    source, current: same shape, any float dtype (each block is cast to the analysis dtype, bf16);
    previous_packed: the last measurement's packed mask (`pack_bits` order) or None; source_sq: ΣW0²
    when already known (it does not change during a run). Same counts as `tensor_counts` (ΣΔ² is
    summed per block in fp32 and across blocks in fp64), without whole-tensor temporaries: on
    SmolLM2-135M this is what keeps a measurement cheap next to a training step.
    """
    src, cur = source.reshape(-1), current.reshape(-1)
    n = src.numel()
    packed = np.empty((n + 7) // 8, dtype=np.uint8)
    changed = delta_sq = 0.0
    known_sq = source_sq is not None
    sq = source_sq or 0.0
    for i in range(0, n, BLOCK):
        s = src[i:i + BLOCK].to(ANALYSIS_DTYPE)
        c = cur[i:i + BLOCK].to(ANALYSIS_DTYPE)
        # |fp32(c) - fp32(s)| > 0 is c != s for bf16 values (+0 == -0 in both); a NaN counts as unchanged
        # in the analysis, and is refused by the training guards before a measurement sees it.
        mask = c != s
        bits = np.packbits(mask.numpy(), bitorder="little")
        packed[i // 8:i // 8 + bits.size] = bits
        changed += float(mask.sum())
        d = c.to(torch.float32) - s.to(torch.float32)
        delta_sq += float(torch.dot(d, d))
        if not known_sq:
            s32 = s.to(torch.float32)
            sq += float(torch.dot(s32, s32))
    packed_t = torch.from_numpy(packed)
    counts = {"numel": float(n), "changed": changed, "delta_sq": delta_sq, "source_sq": sq}
    if previous_packed is not None:
        counts["both"] = float(_POPCOUNT[(packed_t & previous_packed).long()].sum())
        counts["either"] = float(_POPCOUNT[(packed_t | previous_packed).long()].sum())
    return counts, packed_t


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
        self._source_sq: dict[str, float] = {}  # canonical name -> ΣW0² (fp64), taken at the first measurement

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
            previous = self._previous.get(canon) if self._previous is not None else None
            counts, packed[canon] = streamed_counts(self.source.get(canon), p.detach().to("cpu"), previous,
                                                    self._source_sq.get(canon))
            self._source_sq[canon] = counts["source_sq"]
            for block in ("", classify(canon)[2]):
                acc = groups.setdefault(block, {})
                for key, value in counts.items():
                    acc[key] = acc.get(key, 0.0) + value
            shapes[canon] = list(p.shape)
        row = rows_from_counts(groups)
        if self.masks_dir is not None:
            meta = {"kind": "update", "density": repr(row["update/changed_fraction"]), "source": str(self.source.path),
                    "step": str(step), "atol": "0.0", "dtype": "bf16"}
            save_packed_mask(self.masks_dir / f"step-{step}.safetensors", packed, shapes, meta)
        self._previous = packed
        return row
