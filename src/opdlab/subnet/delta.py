"""Sparse deltas: TUNED stored as "BASE plus the coordinates that changed", exact to the bit.

    summary = make_delta("runs/base", "runs/opd", "delta.safetensors")
    result = apply_delta("runs/base", "delta.safetensors", "opd-rebuilt/")   # == runs/opd/final, bit for bit

A delta is one `.safetensors` file. For every tensor of TUNED it stores only what BASE cannot
supply, in TUNED's own dtype, in whichever of four encodings is smallest for that tensor:

  none    no coordinate changed: nothing stored
  index   `index/NAME` (flat int32 indices, int64 from 2**31 elements) + `value/NAME` (nnz,)
  bitmap  `bitmap/NAME` (uint8, one bit per coordinate, little-endian within a byte) + `value/NAME` (nnz,)
  dense   `value/NAME` (numel,): every coordinate (cheaper than either sparse form above)

"Changed" compares raw bits (`bits`), not values: -0.0 vs 0.0 and NaN payloads count, so the
rebuilt tensor equals TUNED's bytes. When BASE stores a tensor in another floating dtype than
TUNED (an fp32 source, a bf16 run), the delta is taken against BASE cast to TUNED's dtype
(round to nearest even, deterministic), which is the same cast applying performs.

The header's `__metadata__` holds `format` = "opdlab-delta", `version` and a JSON `manifest`:
per tensor its TUNED key, file, shape, dtypes, encoding, changed count and the sha256 of BASE's
and TUNED's bytes (applying refuses a BASE with other bytes and checks what it rebuilt); per
TUNED safetensors file its tensors and header metadata; and TUNED's other files (config,
tokenizer, chat template, shard index), embedded as `file/NAME` uint8 tensors unless BASE's
folder holds the same bytes under the same name (then they are copied from BASE, hash-checked).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from opdlab.analysis.pairs import Checkpoint
from opdlab.errors import UserError
from opdlab.fileio import OUTPUT_MARKER, atomic_path, save_safetensors
from opdlab.subnet.masks import pack_bits, unpack_bits

FORMAT = "opdlab-delta"
VERSION = 1
ENCODINGS = ("none", "index", "bitmap", "dense")
_INT32_LIMIT = 2**31
_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Weights in formats the delta does not carry (opdlab reads only safetensors weights).
_OTHER_WEIGHTS = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".onnx"}

# ----------------------------------------------------------------------------- tensor math (pure)


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's raw bits as a flat integer tensor of the same element size: (numel,) uint8/int16/int32/int64."""
    flat = t.detach().contiguous().reshape(-1)
    view = _BIT_VIEWS.get(flat.element_size())
    if view is None or flat.is_complex():
        raise UserError(f"tensors of dtype {t.dtype} are not supported in a delta")
    return flat.view(view)


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of t's bytes in row-major order (its storage dtype, no cast)."""
    return hashlib.sha256(bits(t).view(torch.uint8).numpy().data).hexdigest()


def encoding_bytes(numel: int, changed: int, value_bytes: int) -> dict[str, int]:
    """Stored bytes of one tensor under each encoding (see module docs)."""
    index_bytes = 4 if numel < _INT32_LIMIT else 8
    return {"none": 0 if changed == 0 else -1,
            "index": changed * (index_bytes + value_bytes),
            "bitmap": (numel + 7) // 8 + changed * value_bytes,
            "dense": numel * value_bytes}


def choose_encoding(numel: int, changed: int, value_bytes: int) -> str:
    """The smallest encoding for a tensor of `numel` coordinates with `changed` of them changed."""
    if changed == 0:
        return "none"
    sizes = encoding_bytes(numel, changed, value_bytes)
    return min(("index", "bitmap", "dense"), key=lambda e: sizes[e])


def like_tuned(base: torch.Tensor, tuned_dtype: torch.dtype, name: str) -> torch.Tensor:
    """BASE's tensor in TUNED's dtype: as is when they agree, a floating cast between float dtypes."""
    if base.dtype == tuned_dtype:
        return base
    if base.dtype.is_floating_point and tuned_dtype.is_floating_point:
        return base.to(tuned_dtype)
    raise UserError(f"tensor '{name}' is {_dtype_name(base.dtype)} in BASE but {_dtype_name(tuned_dtype)} in TUNED; "
                    "a delta casts only between floating dtypes, so pass checkpoints of the same dtypes")


def encode(base: torch.Tensor, tuned: torch.Tensor) -> tuple[str, dict[str, torch.Tensor], int]:
    """(encoding, stored tensors by role "index"/"bitmap"/"value", changed count) of tuned against base.

    base, tuned: same shape and dtype (cast BASE first with `like_tuned`).
    """
    if base.shape != tuned.shape or base.dtype != tuned.dtype:
        raise ValueError(f"encode needs one shape and dtype; got {base.dtype} {tuple(base.shape)} "
                         f"and {tuned.dtype} {tuple(tuned.shape)}")
    flat = tuned.detach().contiguous().reshape(-1)
    changed_mask = bits(base) != bits(tuned)
    changed = int(changed_mask.sum())
    encoding = choose_encoding(flat.numel(), changed, flat.element_size())
    if encoding == "none":
        return encoding, {}, 0
    if encoding == "dense":
        return encoding, {"value": flat.clone()}, changed
    values = flat[changed_mask].clone()
    if encoding == "bitmap":
        return encoding, {"bitmap": pack_bits(changed_mask), "value": values}, changed
    index = changed_mask.nonzero().squeeze(1)
    return encoding, {"index": index.to(torch.int32) if flat.numel() < _INT32_LIMIT else index, "value": values}, changed


def decode(base: torch.Tensor, encoding: str, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """TUNED's tensor rebuilt from `base` (already in TUNED's dtype) and the stored parts of `encode`.

    Values are written through integer views of the bits, so every byte is copied as stored.
    """
    if encoding == "none":
        return base.clone()
    values = stored["value"]
    if values.dtype != base.dtype:
        raise ValueError(f"stored values are {values.dtype}, the tensor is {base.dtype}")
    if encoding == "dense":
        if values.numel() != base.numel():
            raise ValueError(f"dense values hold {values.numel()} coordinates, the tensor {base.numel()}")
        return values.reshape(base.shape).clone()
    out = base.detach().contiguous().clone()
    out_bits = bits(out)  # a view: writing it writes `out`
    if encoding == "bitmap":
        where = unpack_bits(stored["bitmap"], out.numel())
        if int(where.sum()) != values.numel():
            raise ValueError(f"bitmap marks {int(where.sum())} coordinates but {values.numel()} values are stored")
        out_bits[where] = bits(values)
    elif encoding == "index":
        index = stored["index"].long()
        if index.numel() != values.numel():
            raise ValueError(f"{index.numel()} indices but {values.numel()} values are stored")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= out.numel()):
            raise ValueError(f"an index lies outside the tensor's {out.numel()} coordinates")
        out_bits[index] = bits(values)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# ----------------------------------------------------------------------------- checkpoints and files


@dataclass
class DeltaSummary:
    """What `make_delta` wrote: sizes in bytes and counts of coordinates and tensors."""

    path: Path
    delta_bytes: int
    checkpoint_bytes: int  # TUNED's safetensors files on disk
    changed: int
    numel: int
    tensors: int
    encodings: dict[str, int] = field(default_factory=dict)  # encoding -> tensor count
    embedded_files: list[str] = field(default_factory=list)
    base_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)


@dataclass
class ApplySummary:
    """What `apply_delta` wrote."""

    path: Path
    tensors: int
    changed: int
    files: list[str]


def _folder_of(ck: Checkpoint, given: str | Path) -> Path | None:
    """The model folder whose other files (config, tokenizer) belong to the checkpoint; None for a lone file."""
    if Path(given).is_file() and Path(given).suffix == ".safetensors":
        return None
    return ck.files[0].parent


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _side_files(folder: Path | None, weight_files: list[Path]) -> tuple[list[Path], list[str]]:
    """(the folder's other files to carry, names of other-format weights that are left out)."""
    if folder is None:
        return [], []
    weights = {f.resolve() for f in weight_files}
    keep, skipped = [], []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.resolve() in weights:
            continue
        if f.suffix == ".safetensors" or f.suffix in _OTHER_WEIGHTS:
            skipped.append(f.name)
            continue
        keep.append(f)
    return keep, skipped


def _header_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        return dict(fh.metadata() or {})


def _check_names(base: Checkpoint, tuned: Checkpoint) -> None:
    only_base = [n for n in base.names() if n not in tuned]
    only_tuned = [n for n in tuned.names() if n not in base]
    if only_base or only_tuned:
        name, side = (only_tuned[0], "TUNED") if only_tuned else (only_base[0], "BASE")
        more = len(only_base) + len(only_tuned) - 1
        raise UserError(f"{tuned.path if side == 'TUNED' else base.path}: tensor '{name}' is only in {side}"
                        + (f" (and {more} more differ)" if more else "")
                        + "; a delta needs BASE and TUNED with the same tensors (the same architecture)")
    for name in tuned.names():
        if base.shape(name) != tuned.shape(name):
            raise UserError(f"{tuned.path}: tensor '{name}' has shape {list(tuned.shape(name))} but "
                            f"{list(base.shape(name))} in BASE {base.path}; a delta needs the same shapes")


def make_delta(base: str | Path, tuned: str | Path, out: str | Path) -> DeltaSummary:
    """Write the delta that turns BASE into TUNED (see module docs) atomically at `out`.

    BASE and TUNED: a model folder (sharded or not), a `.safetensors` file, or an opdlab run
    folder (its `final/`). Tensors are read one at a time; the stored parts are held in memory
    until the file is written (at most the size of TUNED, when every tensor is dense).
    """
    base_ck, tuned_ck = Checkpoint(base), Checkpoint(tuned)
    _check_names(base_ck, tuned_ck)
    tuned_folder, base_folder = _folder_of(tuned_ck, tuned), _folder_of(base_ck, base)
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    files: dict[str, dict[str, Any]] = {}
    changed_total = numel_total = 0
    encodings = {e: 0 for e in ENCODINGS}
    for f in tuned_ck.files:
        rel = f.relative_to(tuned_folder).as_posix() if tuned_folder is not None else f.name
        files[rel] = {"metadata": _header_metadata(f), "tensors": []}
    for name in tuned_ck.names():
        f, key = tuned_ck.location(name)
        rel = f.relative_to(tuned_folder).as_posix() if tuned_folder is not None else f.name
        t, b = tuned_ck.get(name), base_ck.get(name)
        encoding, stored, changed = encode(like_tuned(b, t.dtype, name), t)
        for role, value in stored.items():
            tensors[f"{role}/{name}"] = value
        records[name] = {"key": key, "file": rel, "shape": list(t.shape), "dtype": _dtype_name(t.dtype),
                         "base_dtype": _dtype_name(b.dtype), "encoding": encoding, "changed": changed,
                         "base_sha256": tensor_sha256(b), "sha256": tensor_sha256(t)}
        files[rel]["tensors"].append(name)
        changed_total += changed
        numel_total += t.numel()
        encodings[encoding] += 1

    side, skipped = _side_files(tuned_folder, tuned_ck.files)
    side_records: dict[str, dict[str, str]] = {}
    embedded, from_base = [], []
    for f in side:
        digest = _file_sha256(f)
        twin = base_folder / f.name if base_folder is not None else None
        if twin is not None and twin.is_file() and _file_sha256(twin) == digest:
            side_records[f.name] = {"sha256": digest, "from": "base"}
            from_base.append(f.name)
        else:
            side_records[f.name] = {"sha256": digest, "from": "delta"}
            tensors[f"file/{f.name}"] = torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) \
                if f.stat().st_size else torch.zeros(0, dtype=torch.uint8)
            embedded.append(f.name)

    manifest = {"base": str(base), "tuned": str(tuned), "tensors": records, "files": files, "side_files": side_records}
    out = Path(out)
    save_safetensors(out, tensors, metadata={"format": FORMAT, "version": str(VERSION),
                                             "manifest": json.dumps(manifest, sort_keys=True)})
    return DeltaSummary(path=out, delta_bytes=out.stat().st_size,
                        checkpoint_bytes=sum(f.stat().st_size for f in tuned_ck.files), changed=changed_total,
                        numel=numel_total, tensors=len(records), encodings={k: v for k, v in encodings.items() if v},
                        embedded_files=embedded, base_files=from_base, skipped_files=skipped)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a delta file; UserError for a missing, unreadable or non-delta file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: delta file not found; make one with `opdlab delta BASE TUNED --out {path.name}`")
    try:
        meta = _header_metadata(path)
    except (SafetensorError, OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable safetensors file ({msg})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not an opdlab delta (its header has no format={FORMAT}); "
                        "make one with `opdlab delta BASE TUNED --out FILE`")
    if meta.get("version") != str(VERSION):
        raise UserError(f"{path}: delta format version {meta.get('version')!r}; this opdlab reads version {VERSION}")
    try:
        manifest = json.loads(meta["manifest"])
        for key in ("tensors", "files", "side_files"):
            if not isinstance(manifest[key], dict):
                raise TypeError(key)
    except (KeyError, TypeError, json.JSONDecodeError):
        raise UserError(f"{path}: the delta's manifest is missing or damaged; make the delta again") from None
    return manifest


def apply_delta(base: str | Path, delta: str | Path, out: str | Path) -> ApplySummary:
    """Rebuild TUNED from BASE and `delta` into the folder `out` (written atomically, replaced if it exists).

    Refuses a BASE whose tensor names, shapes, dtypes or bytes differ from the BASE the delta was
    made from, and checks every rebuilt tensor and file against TUNED's recorded sha256. The
    caller decides whether `out` may be replaced (the CLI asks for --overwrite).
    """
    delta = Path(delta)
    manifest = read_manifest(delta)
    base_ck = Checkpoint(base)
    records = manifest["tensors"]
    missing = [n for n in records if n not in base_ck]
    extra = [n for n in base_ck.names() if n not in records]
    if missing or extra:
        name, where = (missing[0], "is missing from BASE") if missing else (extra[0], "is in BASE but not in the delta")
        raise UserError(f"{base_ck.path}: tensor '{name}' {where}; pass the BASE the delta was made from "
                        f"({manifest.get('base')})")
    base_folder = _folder_of(base_ck, base)
    changed_total = 0
    written: list[str] = []
    out = Path(out)
    try:
        with safe_open(str(delta), framework="pt", device="cpu") as stored_fh, atomic_path(out) as tmp:
            stored_keys = set(stored_fh.keys())
            tmp.mkdir()
            for rel, info in manifest["files"].items():
                tensors: dict[str, torch.Tensor] = {}
                for name in info["tensors"]:
                    rec = records[name]
                    b = base_ck.get(name)
                    if list(b.shape) != rec["shape"] or _dtype_name(b.dtype) != rec["base_dtype"]:
                        raise UserError(f"{base_ck.path}: tensor '{name}' is {_dtype_name(b.dtype)} {list(b.shape)} but the "
                                        f"delta was made from {rec['base_dtype']} {rec['shape']}; pass the BASE the "
                                        f"delta was made from ({manifest.get('base')})")
                    if tensor_sha256(b) != rec["base_sha256"]:
                        raise UserError(f"{base_ck.path}: tensor '{name}' holds other values than the BASE the delta "
                                        f"was made from ({manifest.get('base')}); pass that BASE")
                    parts = {role: stored_fh.get_tensor(f"{role}/{name}") for role in ("index", "bitmap", "value")
                             if f"{role}/{name}" in stored_keys}
                    try:
                        t = decode(like_tuned(b, _dtype(rec["dtype"]), name), rec["encoding"], parts)
                    except (KeyError, ValueError) as exc:
                        raise UserError(f"{delta}: tensor '{name}' is damaged in the delta ({exc}); make the delta again") from None
                    if tensor_sha256(t) != rec["sha256"]:
                        raise UserError(f"{delta}: tensor '{name}' does not rebuild TUNED's bytes (sha256 differs); "
                                        "the delta file is damaged; make it again")
                    tensors[rec["key"]] = t
                    changed_total += rec["changed"]
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                save_file(tensors, str(target), metadata=info["metadata"] or None)
                written.append(rel)
                del tensors
            for fname, rec in manifest["side_files"].items():
                target = tmp / fname
                if rec["from"] == "base":
                    twin = base_folder / fname if base_folder is not None else None
                    if twin is None or not twin.is_file() or _file_sha256(twin) != rec["sha256"]:
                        raise UserError(f"{base_ck.path}: the delta takes '{fname}' from BASE's folder, which "
                                        f"{'lacks it' if twin is None or not twin.is_file() else 'holds another version'}; "
                                        f"pass the BASE folder the delta was made from ({manifest.get('base')})")
                    shutil.copyfile(twin, target)
                else:
                    target.write_bytes(stored_fh.get_tensor(f"file/{fname}").numpy().tobytes())
                    if _file_sha256(target) != rec["sha256"]:
                        raise UserError(f"{delta}: file '{fname}' is damaged in the delta; make the delta again")
                written.append(fname)
            (tmp / OUTPUT_MARKER).write_text("written by opdlab; --overwrite may replace this folder\n")
    except SafetensorError as exc:
        raise UserError(f"{delta}: cannot read the delta ({str(exc).splitlines()[0]}); make the delta again") from None
    return ApplySummary(path=out, tensors=len(records), changed=changed_total, files=written)
