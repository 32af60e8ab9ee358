"""Subnetwork masks: extract, save/load, fit to a model, random controls, union/intersection, overlap.

A mask is a `.safetensors` file of bool tensors keyed by canonical parameter names
(`opdlab.analysis.pairs.canonical_name`), with string metadata in the header:
`kind` (extract | random_like | top_update_like | union | intersect), `source`, `tuned`, `atol`,
`dtype`, `density`, `seed`. True means "this coordinate may be trained".

    masks = extract_mask("runs/base", "runs/opd", atol=0.0, dtype="bf16")
    save_mask("mask.safetensors", masks, mask_metadata("extract", masks, source=..., tuned=...))
    masks, meta = load_mask("mask.safetensors")
    fitted = fit_mask_to_model(masks, list(model.named_parameters()), "mask.safetensors")
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
import zlib
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from opdlab.analysis.aggregate import classify
from opdlab.analysis.metrics_overlap import add_counts, overlap_counts, overlap_stats
from opdlab.analysis.metrics_sparsity import changed_mask
from opdlab.analysis.pairs import Checkpoint, analyzable, canonical_name, iter_pairs, match_tensors
from opdlab.errors import UserError
from opdlab.fileio import save_safetensors

MaskDict = dict[str, torch.Tensor]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# ----------------------------------------------------------------------------- files


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool (n,) -> uint8 (ceil(n/8),); bit j of byte i is mask[8*i + j]."""
    n = mask.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
    padded[:n] = mask.reshape(-1).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_bits`: uint8 (ceil(n/8),) -> bool (n,)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"bitmap of {n} coordinates must be uint8 ({(n + 7) // 8},); got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].bool()



def load_mask(path: str | Path) -> tuple[MaskDict, dict[str, str]]:
    """Read a mask file -> (bool tensors by name, header metadata). Bad files raise UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: mask file not found; create one with `opdlab mask BASE TUNED --out {path.name}`")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            shapes = _packed_shapes(path, metadata)
            masks: MaskDict = {}
            for key in fh.keys():
                dtype = fh.get_slice(key).get_dtype()
                if shapes is not None:
                    if dtype != "U8" or key not in shapes:
                        raise UserError(f"{path}: tensor '{key}' is not a bit-packed mask entry (uint8 with a shape "
                                        "in the header's 'shapes')")
                    shape = shapes[key]
                    masks[key] = unpack_bits(fh.get_tensor(key), math.prod(shape)).view(shape)
                    continue
                if dtype != "BOOL":
                    raise UserError(f"{path}: tensor '{key}' has dtype {dtype}; a mask holds only bool tensors")
                masks[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable safetensors mask file ({msg})") from None
    if not masks:
        raise UserError(f"{path}: the mask file holds no tensors")
    return masks, metadata


def save_mask(path: str | Path, masks: MaskDict, metadata: dict[str, str], packed: bool = False) -> None:
    """Write bool `masks` and string `metadata` to a safetensors file atomically.

    `packed`: one bit per coordinate (uint8 tensors, `pack_bits` order), with `packing` = "bits" and
    the tensors' `shapes` (JSON) in the header: 8x smaller; `load_mask` unpacks it.
    """
    for name, m in masks.items():
        if m.dtype != torch.bool:
            raise ValueError(f"save_mask: tensor '{name}' is {m.dtype}, expected torch.bool")
    if packed:
        save_packed_mask(path, {name: pack_bits(m.detach().to("cpu")) for name, m in masks.items()},
                         {name: list(m.shape) for name, m in masks.items()}, metadata)
        return
    tensors = {name: m.detach().to("cpu").contiguous() for name, m in masks.items()}
    save_safetensors(path, tensors, metadata={k: str(v) for k, v in metadata.items()})


def save_packed_mask(path: str | Path, packed: dict[str, torch.Tensor], shapes: dict[str, list[int]],
                     metadata: dict[str, str]) -> None:
    """Write masks already bit-packed (`pack_bits`) with their `shapes`, atomically (see `save_mask`)."""
    meta = {k: str(v) for k, v in metadata.items()}
    meta.update({"packing": "bits", "shapes": json.dumps({name: list(shapes[name]) for name in packed})})
    save_safetensors(path, packed, metadata=meta)


def _packed_shapes(path: Path, metadata: dict[str, str]) -> dict[str, list[int]] | None:
    """The tensor shapes of a bit-packed mask file, None for a bool one; UserError for a bad header."""
    packing = metadata.get("packing")
    if packing is None:
        return None
    try:
        if packing != "bits":
            raise ValueError
        shapes = json.loads(metadata["shapes"])
        if not isinstance(shapes, dict) or not all(
                isinstance(v, list) and all(isinstance(d, int) and d >= 0 for d in v) for v in shapes.values()):
            raise ValueError
    except (KeyError, ValueError):
        raise UserError(f"{path}: header says packing={packing!r} but has no valid 'shapes'; "
                        "a packed mask needs packing=bits and the JSON shapes of its tensors") from None
    return shapes


def density(masks: MaskDict) -> float:
    """Fraction of True coordinates over all tensors (numel-weighted)."""
    n = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / n if n else 0.0


def mask_metadata(kind: str, masks: MaskDict, **fields: object) -> dict[str, str]:
    """Header metadata: kind, density and any extra fields (None values dropped), all as strings."""
    meta = {"kind": kind, "density": repr(density(masks))}
    meta.update({k: str(v) for k, v in fields.items() if v is not None})
    return meta


# ----------------------------------------------------------------------------- training


def fit_mask_to_model(
    masks: MaskDict, named_params: Iterable[tuple[str, torch.nn.Parameter]], source: str
) -> dict[str, torch.Tensor]:
    """Line mask tensors up with a model's parameters by canonical name and check shapes.

    Returns one bool tensor per parameter (keyed by the model's own names, on the parameter's
    device). Parameters with no mask entry get an all-false mask — they are frozen entirely —
    and a warning says how many. A mask tensor with no matching parameter or a wrong shape is
    a UserError naming it (`source` is the mask file, for the message).
    """
    named_params = list(named_params)
    by_canon = {canonical_name(k): k for k in masks}
    params_canon = {canonical_name(n) for n, _ in named_params}
    unknown = [k for c, k in by_canon.items() if c not in params_canon]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UserError(f"{source}: mask tensor '{unknown[0]}'{more} is not a parameter of the model; "
                        "was the mask made for another architecture?")
    fitted: dict[str, torch.Tensor] = {}
    frozen_tensors = frozen_coords = 0
    for name, p in named_params:
        key = by_canon.get(canonical_name(name))
        if key is None:
            fitted[name] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            frozen_tensors += 1
            frozen_coords += p.numel()
            continue
        m = masks[key]
        if m.dtype != torch.bool:
            raise UserError(f"{source}: tensor '{key}' has dtype {m.dtype}; a mask holds only bool tensors")
        if tuple(m.shape) != tuple(p.shape):
            raise UserError(f"{source}: tensor '{key}' has shape {list(m.shape)} but the model's parameter "
                            f"'{name}' has shape {list(p.shape)}; the mask was made for another model")
        fitted[name] = m.to(p.device)
    if frozen_tensors:
        warnings.warn(f"{source}: {frozen_tensors} parameter(s) ({frozen_coords} coordinates) have no mask "
                      "entry and stay frozen", stacklevel=2)
    return fitted


def zero_grads_outside(named_params: Iterable[tuple[str, torch.nn.Parameter]], masks: dict[str, torch.Tensor]) -> None:
    """Set every gradient coordinate outside its mask to exactly 0 (None for unmasked parameters).

    Called before gradient clipping so the global norm counts only trainable coordinates.
    `masked_fill_` (not a multiply) so a NaN/inf gradient outside the mask cannot leak in.
    """
    for name, p in named_params:
        if p.grad is None:
            continue
        m = masks.get(name)
        if m is None:
            p.grad = None
        else:
            p.grad.masked_fill_(m.logical_not(), 0)


# ----------------------------------------------------------------------------- making masks


def extract_mask(
    base: str | Path | Checkpoint, tuned: str | Path | Checkpoint, atol: float = 0.0,
    dtype: str = "bf16", device: str = "cpu", progress: bool = True,
) -> MaskDict:
    """The coordinates TUNED changed from BASE: |W' - W| > atol in the analysis dtype (DESIGN "Sparsity").

    Streams one tensor pair at a time. Padded vocabularies (compared on shared rows) give a
    mask of the base's shape with the extra rows False. Returns CPU bool tensors keyed by
    canonical name.
    """
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    fp32 = dtype == "fp32"  # an fp32 mask reads a run's final-fp32/ where it exists (analysis/stream.py)
    base_ck = base if isinstance(base, Checkpoint) else Checkpoint(base, prefer_fp32=fp32)
    tuned_ck = tuned if isinstance(tuned, Checkpoint) else Checkpoint(tuned, prefer_fp32=fp32)
    matching = match_tensors(base_ck, tuned_ck)
    # Only floating-point tensors can be trained; a mask of an empty one is empty (and harmless).
    names, _ = analyzable([base_ck, tuned_ck], matching.names, keep_empty=True)
    matching = dataclasses.replace(matching, names=names)
    masks: MaskDict = {}
    pairs = iter_pairs(base_ck, tuned_ck, DTYPES[dtype], matching)
    for pair in tqdm(pairs, total=len(matching.names), desc="mask", unit="tensor", disable=not progress, leave=False):
        changed = changed_mask(pair.source.to(device), pair.tuned.to(device), atol).to("cpu", torch.bool)
        if pair.name in matching.rows:
            full = torch.zeros(base_ck.shape(pair.name), dtype=torch.bool)
            full[: changed.shape[0]] = changed
            changed = full
        masks[pair.name] = changed
    return masks


def sample_indices(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct indices drawn uniformly from range(n), in O(k) memory (int64, sorted).

    Draws uniform integers until at least k distinct ones are seen, then keeps a random k of
    them; any procedure symmetric in the coordinates gives a uniform k-subset. For k > n/2 it
    samples the complement instead, so the number of draws stays below ~2k.
    """
    if k > n // 2:
        keep = torch.ones(n, dtype=torch.bool)
        keep[sample_indices(n, n - k, gen)] = False
        return keep.nonzero().squeeze(1)
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draw = torch.randint(0, n, (need + need // 8 + 16,), generator=gen)
        chosen = torch.unique(torch.cat([chosen, draw]))
    if chosen.numel() > k:
        chosen = chosen[torch.randperm(chosen.numel(), generator=gen)[:k]].sort().values
    return chosen


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from (seed, tensor name): a tensor's draw does not depend on the other tensors."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**64)  # any 64-bit seed


def random_like(masks: MaskDict, seed: int = 0) -> MaskDict:
    """A random control mask with exactly the same number of True entries in every tensor.

    Each tensor's draw is seeded from (seed, tensor name), so it does not depend on the order
    or the set of other tensors in the file.
    """
    out: MaskDict = {}
    for name, m in masks.items():
        gen = tensor_generator(seed, name)
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[sample_indices(m.numel(), int(m.sum()), gen)] = True
        out[name] = flat.view(m.shape)
    return out


def top_update_like(
    base: str | Path | Checkpoint, tuned: str | Path | Checkpoint, like: MaskDict,
    dtype: str = "fp32", device: str = "cpu", progress: bool = True,
) -> MaskDict:
    """The coordinates with the largest |W' - W| (in `dtype`), as many per tensor as `like` holds.

    The magnitude control of a subnetwork mask: same per-tensor density as `like` (say the bf16
    |delta| > 1e-5 mask), but chosen by update size in fp32. Where it differs from `like`, the
    bf16 mask carries something beyond update magnitude. Ties at the cut are broken by position
    (torch.topk), so every tensor holds exactly `like`'s count. Tensors of `like` the pair lacks
    are an error naming the tensor. Padded vocabularies are compared on shared rows, as in
    `extract_mask`.
    """
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    fp32 = dtype == "fp32"
    base_ck = base if isinstance(base, Checkpoint) else Checkpoint(base, prefer_fp32=fp32)
    tuned_ck = tuned if isinstance(tuned, Checkpoint) else Checkpoint(tuned, prefer_fp32=fp32)
    matching = match_tensors(base_ck, tuned_ck)
    missing = sorted(set(like) - set(matching.names))
    if missing:
        raise UserError(f"mask tensor '{missing[0]}' is not in both checkpoints; was the mask made for this pair?")
    out: MaskDict = {}
    pairs = iter_pairs(base_ck, tuned_ck, DTYPES[dtype], matching)
    for pair in tqdm(pairs, total=len(matching.names), desc="top-update mask", unit="tensor", disable=not progress,
                     leave=False):
        if pair.name not in like:
            continue
        target = like[pair.name]
        size = (pair.tuned.to(device).float() - pair.source.to(device).float()).abs().flatten()
        full_size = torch.full((target.numel(),), -1.0)  # rows only the base has never rank above a real change
        full_size[: size.numel()] = size.cpu()
        chosen = torch.zeros(target.numel(), dtype=torch.bool)
        k = int(target.sum())
        if k:
            chosen[torch.topk(full_size, k, sorted=False).indices] = True
        out[pair.name] = chosen.view(target.shape)
    return out


def _combine(masks_list: list[MaskDict], sources: list[str], op: str) -> MaskDict:
    if len(masks_list) < 2:
        raise UserError(f"--{op} needs at least two masks; got {len(masks_list)}")
    first, first_src = masks_list[0], sources[0]
    out = {name: m.clone() for name, m in first.items()}
    for other, src in zip(masks_list[1:], sources[1:]):
        if set(other) != set(first):
            name = sorted(set(other) ^ set(first))[0]
            where = src if name in other else first_src
            raise UserError(f"{where}: tensor '{name}' is not in every mask; --{op} needs masks of the same model")
        for name, m in other.items():
            if m.shape != out[name].shape:
                raise UserError(f"{src}: tensor '{name}' has shape {list(m.shape)} but {list(out[name].shape)} "
                                f"in {first_src}; --{op} needs masks of the same model")
            if op == "union":
                out[name] |= m
            else:
                out[name] &= m
    return out


def union(masks_list: list[MaskDict], sources: list[str] | None = None) -> MaskDict:
    """Coordinates true in any of the masks (same names and shapes required)."""
    return _combine(masks_list, sources or [f"mask {i}" for i in range(len(masks_list))], "union")


def intersect(masks_list: list[MaskDict], sources: list[str] | None = None) -> MaskDict:
    """Coordinates true in all of the masks (same names and shapes required)."""
    return _combine(masks_list, sources or [f"mask {i}" for i in range(len(masks_list))], "intersect")


def overlap(mask_a: MaskDict, mask_b: MaskDict, source_a: str = "A", source_b: str = "B") -> dict[str, object]:
    """Overlap of two masks against chance (DESIGN 7): whole model, and per tensor.

    Returns {"total": {...}, "blocks": {block: {...}}, "tensors": {name: {...}}}, each entry the
    integer counts (n, a, b, both) — which add up across tensors — and the stats derived from them.
    """
    if set(mask_a) != set(mask_b):
        name = sorted(set(mask_a) ^ set(mask_b))[0]
        where = source_a if name in mask_a else source_b
        raise UserError(f"{where}: tensor '{name}' is only in this mask; --overlap needs masks of the same model")
    total: dict[str, int] = {}
    blocks: dict[str, dict[str, int]] = {}
    tensors: dict[str, dict[str, object]] = {}
    for name, a in mask_a.items():
        b = mask_b[name]
        if a.shape != b.shape:
            raise UserError(f"{source_b}: tensor '{name}' has shape {list(b.shape)} but {list(a.shape)} in "
                            f"{source_a}; --overlap needs masks of the same model")
        counts = overlap_counts(a, b)
        add_counts(total, counts)
        add_counts(blocks.setdefault(classify(canonical_name(name))[2], {}), counts)
        tensors[name] = {**counts, **overlap_stats(counts)}
    return {"total": {**total, **overlap_stats(total)},
            "blocks": {block: {**c, **overlap_stats(c)} for block, c in blocks.items()}, "tensors": tensors}
