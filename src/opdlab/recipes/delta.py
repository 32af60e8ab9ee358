"""`opdlab delta`: ship a run as the coordinates it changed, and rebuild it exactly.

    opdlab delta runs/base runs/opd --out opd-delta.safetensors
    opdlab delta --apply runs/base opd-delta.safetensors --out opd-rebuilt

The first form writes the delta (changed coordinates as indices or a bitmap plus their values,
in the checkpoint's dtype) and prints its size against the full checkpoint; the second rebuilds
TUNED's model folder from BASE, bit for bit. Format and guarantees: docs/subnetworks.md.
"""

from __future__ import annotations

from pathlib import Path

from opdlab.config import DeltaConfig
from opdlab.errors import UserError
from opdlab.fileio import check_out_dir, refuse_out_over_inputs
from opdlab.subnet.delta import apply_delta, make_delta


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def delta(cfg: DeltaConfig) -> Path:
    """Make (BASE TUNED) or apply (--apply BASE DELTA) a delta; returns the file or folder written."""
    making = cfg.base is not None or cfg.tuned is not None
    if making == bool(cfg.apply):
        raise UserError("give either BASE TUNED (make a delta) or --apply BASE DELTA (rebuild TUNED), not "
                        + ("both" if making else "neither"))
    out = Path(cfg.out)
    if cfg.apply:
        if len(cfg.apply) != 2:
            raise UserError(f"--apply takes BASE and DELTA; got {len(cfg.apply)} value(s)")
        check_out_dir(out, cfg.overwrite, inputs={"BASE": cfg.apply[0], "DELTA": cfg.apply[1]})
        result = apply_delta(cfg.apply[0], cfg.apply[1], out)
        print(f"rebuilt {result.tensors} tensors ({result.changed:,} changed coordinates) and "
              f"{len(result.files)} files; every tensor and file matches TUNED's sha256")
        return result.path

    if cfg.base is None or cfg.tuned is None:
        raise UserError("making a delta needs two checkpoints, BASE and TUNED")
    refuse_out_over_inputs(out, {"BASE": cfg.base, "TUNED": cfg.tuned})
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: --out must end in .safetensors")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out must be a .safetensors file")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out}: exists; pass --overwrite or choose another --out")
    s = make_delta(cfg.base, cfg.tuned, out)
    share = s.changed / s.numel if s.numel else 0.0
    encodings = ", ".join(f"{k} {v}" for k, v in s.encodings.items())
    print(f"{s.changed:,} of {s.numel:,} coordinates changed ({share:.3%}) in {s.tensors} tensors ({encodings})")
    print(f"delta {_mib(s.delta_bytes)} vs full checkpoint {_mib(s.checkpoint_bytes)} "
          f"({s.delta_bytes / s.checkpoint_bytes:.2%} of it)")
    if s.embedded_files or s.base_files:
        print(f"model files: {len(s.embedded_files)} carried in the delta, {len(s.base_files)} taken from BASE's folder")
    if s.skipped_files:
        print(f"not carried (weights in other formats): {', '.join(s.skipped_files)}")
    return s.path
