"""`opdlab mask`: extract, randomize, combine or measure subnetwork masks.

    opdlab mask runs/base runs/opd --out mask.safetensors [--atol 0] [--dtype bf16]
    opdlab mask --random-like mask.safetensors --out control.safetensors [--seed 0]
    opdlab mask runs/base runs/opd --top-like mask.safetensors --dtype fp32 --out top.safetensors
    opdlab mask --union a.safetensors b.safetensors --out both.safetensors
    opdlab mask --intersect a.safetensors b.safetensors --out common.safetensors
    opdlab mask --overlap a.safetensors b.safetensors --out overlap.json

Exactly one mode per call. Writes the output atomically, refuses to replace an existing file
unless --overwrite, prints the density per block (or the overlap summary) and returns the path.
File format: docs/subnetworks.md.
"""

from __future__ import annotations

from pathlib import Path

from opdlab.analysis.aggregate import classify
from opdlab.analysis.pairs import canonical_name
from opdlab.config import MaskConfig
from opdlab.devices import check_device
from opdlab.errors import UserError
from opdlab.fileio import refuse_out_over_inputs, write_json
from opdlab.subnet import masks as M


def density_by_block(masks: M.MaskDict) -> dict[str, dict[str, float]]:
    """{block: {"masked": count, "numel": count, "density": fraction}}, plus "all" (blocks as in analysis)."""
    out: dict[str, dict[str, float]] = {}
    for name, m in masks.items():
        row = out.setdefault(classify(canonical_name(name))[2], {"masked": 0, "numel": 0})
        row["masked"] += int(m.sum())
        row["numel"] += m.numel()
    out["all"] = {"masked": sum(r["masked"] for r in out.values()), "numel": sum(r["numel"] for r in out.values())}
    for row in out.values():
        row["density"] = row["masked"] / row["numel"] if row["numel"] else 0.0
    return out


def _mode(cfg: MaskConfig) -> str:
    pair = cfg.base is not None or cfg.tuned is not None
    chosen = [mode for mode, on in (
        ("extract", pair and cfg.top_like is None), ("top_like", cfg.top_like is not None),
        ("random_like", cfg.random_like is not None),
        ("union", bool(cfg.union)), ("intersect", bool(cfg.intersect)), ("overlap", bool(cfg.overlap)),
    ) if on]
    if len(chosen) != 1:
        got = ", ".join(chosen) if chosen else "none"
        raise UserError(f"give exactly one of BASE TUNED, BASE TUNED --top-like, --random-like, --union, --intersect, "
                        f"--overlap (got {got})")
    if chosen[0] == "extract" and (cfg.base is None or cfg.tuned is None):
        raise UserError("extraction needs two checkpoints, BASE and TUNED")
    if chosen[0] == "top_like" and (cfg.base is None or cfg.tuned is None):
        raise UserError("--top-like needs the two checkpoints whose update it ranks, BASE and TUNED")
    return chosen[0]


def _check_out(cfg: MaskConfig, out: Path, suffix: str) -> None:
    refuse_out_over_inputs(out, {"BASE": cfg.base, "TUNED": cfg.tuned, "--random-like": cfg.random_like,
                                 "--top-like": cfg.top_like,
                                 "--union": cfg.union, "--intersect": cfg.intersect, "--overlap": cfg.overlap})
    if out.suffix != suffix:
        raise UserError(f"{out}: --out must end in {suffix} for this mode")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out must be a {suffix} file")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out}: exists; pass --overwrite or choose another --out")


def _shared(metas: list[dict[str, str]], key: str) -> str | None:
    """The metadata value all inputs agree on, else None."""
    values = {m.get(key) for m in metas}
    return values.pop() if len(values) == 1 else None


def mask(cfg: MaskConfig) -> Path:
    """Run the one requested mode (see module docs); returns the written file."""
    mode = _mode(cfg)
    out = Path(cfg.out)
    _check_out(cfg, out, ".json" if mode == "overlap" else ".safetensors")

    if mode == "overlap":
        (a, _), (b, _) = M.load_mask(cfg.overlap[0]), M.load_mask(cfg.overlap[1])
        result = M.overlap(a, b, cfg.overlap[0], cfg.overlap[1])
        write_json(out, {"schema": 1, "a": cfg.overlap[0], "b": cfg.overlap[1], **result})
        t = result["total"]
        print(f"density A {t['density_a']:.4%}, B {t['density_b']:.4%}; Jaccard {t['jaccard']:.4f} "
              f"(chance {t['jaccard_random']:.4f}, ratio {t['jaccard_ratio']:.2f}); "
              f"|A∩B|/|A| {t['coverage_a']:.4f} (chance {t['coverage_a_random']:.4f}), "
              f"|A∩B|/|B| {t['coverage_b']:.4f} (chance {t['coverage_b_random']:.4f})")
        return out

    if mode == "extract":
        check_device(cfg.device, "--device")
        masks = M.extract_mask(cfg.base, cfg.tuned, atol=cfg.atol, dtype=cfg.dtype, device=cfg.device)
        meta = M.mask_metadata("extract", masks, source=cfg.base, tuned=cfg.tuned, atol=cfg.atol, dtype=cfg.dtype)
    elif mode == "top_like":
        check_device(cfg.device, "--device")
        like, _ = M.load_mask(cfg.top_like)
        masks = M.top_update_like(cfg.base, cfg.tuned, like, dtype=cfg.dtype, device=cfg.device)
        meta = M.mask_metadata("top_update_like", masks, source=cfg.top_like, base=cfg.base, tuned=cfg.tuned,
                               dtype=cfg.dtype)
    elif mode == "random_like":
        parent, parent_meta = M.load_mask(cfg.random_like)
        masks = M.random_like(parent, cfg.seed)
        meta = M.mask_metadata("random_like", masks, source=cfg.random_like, seed=cfg.seed,
                               atol=parent_meta.get("atol"), dtype=parent_meta.get("dtype"))
    else:
        paths = cfg.union or cfg.intersect
        loaded = [M.load_mask(p) for p in paths]
        combine = M.union if mode == "union" else M.intersect
        masks = combine([m for m, _ in loaded], list(paths))
        metas = [meta for _, meta in loaded]
        meta = M.mask_metadata(mode, masks, source=",".join(paths), atol=_shared(metas, "atol"),
                               dtype=_shared(metas, "dtype"))
    M.save_mask(out, masks, meta)
    for block, row in density_by_block(masks).items():
        print(f"{block:>10}: density {row['density']:.4%} ({row['masked']:,} of {row['numel']:,})")
    return out
