"""Open checkpoints lazily and stream matching tensor pairs from two of them.

A checkpoint is whatever a user has: a Hugging Face model folder (one `model.safetensors`
or shards with `model.safetensors.index.json`), a single `.safetensors` file, or an
opdlab run folder (its `final/` checkpoint). Files are memory-mapped by safetensors, so
reading one tensor never loads the model. Names are compared after canonicalization, so
a vision-language checkpoint (`model.language_model.layers.0...`) matches a plain
language model (`model.layers.0...`). Pickle checkpoints (`*.bin`, `*.pt`) are refused.

Example::

    base, tuned = open_checkpoint("runs/a/../source"), open_checkpoint("runs/a")
    for pair in iter_pairs(base, tuned, dtype=torch.bfloat16):
        print(pair.name, pair.source.shape)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import yaml
from safetensors import SafetensorError, safe_open

from opdlab.analysis.blocks import FLOAT_DTYPES, read_rows
from opdlab.errors import UserError
from opdlab.fileio import shard_files
from opdlab.models.gguf import as_gguf_folder

# Applied in order to every tensor name; the first matching rule wins.
_CANONICAL_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^language_model\.model\."), "model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^model\.text_model\."), "model."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.vision_model\."), "vision_model."),
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.connector\."), "connector."),
]

# Written by opdlab.models.gguf next to a dequantized GGUF model (same name as its GGUF_INFO_FILE;
# read here as plain JSON so the analysis does not depend on the model-loading code).
GGUF_INFO_FILE = "opdlab_gguf.json"

_VOCAB_NAMES = re.compile(r"(embed_tokens|wte|word_embeddings|lm_head|output)\.weight$")


def canonical_name(name: str) -> str:
    """Map a parameter name to the form used for matching across model families."""
    for pattern, repl in _CANONICAL_RULES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name


def resolve_checkpoint_files(path: str | Path, prefer_fp32: bool = False) -> list[Path]:
    """The safetensors files that make up the checkpoint at `path` (see module docs).

    With `prefer_fp32`, an opdlab run folder resolves to `final-fp32/` when it exists. A `.gguf`
    file, or the name of a shipped real model, resolves to its dequantized cached folder.
    """
    converted = as_gguf_folder(path, "base")
    if converted is not None:
        return resolve_checkpoint_files(converted)
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or folder; pass a model folder, a .safetensors file or an opdlab run folder")
    if p.is_file():
        if p.suffix == ".safetensors":
            return [p]
        if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}:
            raise UserError(f"{p}: pickle checkpoints are not read (they can run code); convert it to .safetensors first")
        raise UserError(f"{p}: not a .safetensors file; pass a model folder or a .safetensors file")
    # An opdlab run folder: use its final checkpoint.
    for sub in (["final-fp32", "final"] if prefer_fp32 else ["final"]):
        if (p / sub).is_dir() and (p / "config.yaml").is_file():
            return resolve_checkpoint_files(p / sub)
    shards = shard_files(p)
    if shards is not None:
        return shards
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"]
    files = sorted(p.glob("*.safetensors"))
    if files:
        return files
    if any(p.glob("*.bin")) or any(p.glob("*.pt")):
        raise UserError(f"{p}: holds only pickle weights (*.bin/*.pt), which opdlab does not read; save the model with safetensors")
    raise UserError(f"{p}: not a model folder (no *.safetensors files, no final/ checkpoint)")


class Checkpoint:
    """A lazily read checkpoint: tensor names, shapes and one tensor at a time."""

    def __init__(self, path: str | Path, prefer_fp32: bool = False) -> None:
        self.path = Path(path)
        self.files = resolve_checkpoint_files(path, prefer_fp32=prefer_fp32)
        self._handles = {}
        self._where: dict[str, tuple[Path, str]] = {}
        for f in self.files:
            handle = self._open(f)
            for key in handle.keys():
                canon = canonical_name(key)
                if canon in self._where:
                    raise UserError(f"{f}: tensor '{key}' appears twice in the checkpoint (also in {self._where[canon][0].name})")
                self._where[canon] = (f, key)
        if not self._where:
            raise UserError(f"{self.path}: the checkpoint holds no tensors")

    def _open(self, f: Path):  # noqa: ANN202 - safetensors handle type is private
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise UserError(f"{f}: not a readable safetensors file ({msg}); it may be truncated or corrupted") from None
        return self._handles[f]

    @property
    def dtypes(self) -> set[str]:
        """The storage dtypes present (e.g. {'BF16'})."""
        out = set()
        for name in list(self._where)[:50]:
            f, key = self._where[name]
            out.add(self._open(f).get_slice(key).get_dtype())
        return out

    def dtype(self, name: str) -> str:
        """The storage dtype of one tensor as safetensors names it ('BF16', 'F32', 'I64', ...)."""
        f, key = self._where[name]
        return self._open(f).get_slice(key).get_dtype()

    def names(self) -> list[str]:
        """Canonical tensor names, in file order."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        f, key = self._where[name]
        return tuple(self._open(f).get_slice(key).get_shape())

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n

    def get(self, name: str, dtype: torch.dtype | None = None, rows: int | None = None) -> torch.Tensor:
        """Read one tensor (optionally only its first `rows` rows), cast to `dtype`."""
        f, key = self._where[name]
        try:
            if rows is None:
                t = self._open(f).get_tensor(key)
            else:
                t = self._open(f).get_slice(key)[:rows]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{f}: cannot read tensor '{key}' ({str(exc).splitlines()[0]}); the file may be corrupted") from None
        return t.to(dtype) if dtype is not None else t

    def location(self, name: str) -> tuple[Path, str]:
        """(file, key inside that file) of a canonical tensor name."""
        return self._where[name]

    def __contains__(self, name: str) -> bool:
        return name in self._where


def source_format(ck: Checkpoint) -> dict | None:
    """Where a checkpoint's weights came from, when that bears on reading its sparsity; else None.

    Today: a folder dequantized from a GGUF file (it holds `opdlab_gguf.json`) gives
    {"kind": "gguf", "tensor_types": {"Q4_1": 210, ...}, "source": "<.gguf path>"}. The file is
    looked for in the folder `ck` was opened from and in the folders of its safetensors files.
    """
    folders = ([ck.path] if ck.path.is_dir() else []) + [f.parent for f in ck.files]
    for folder in dict.fromkeys(folders):
        info_file = folder / GGUF_INFO_FILE
        if not info_file.is_file():
            continue
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            info = None
        types = info.get("tensor_types") if isinstance(info, dict) else None
        if not isinstance(types, dict):
            raise UserError(f"{info_file}: not a valid GGUF record (needs a 'tensor_types' object); "
                            "delete the folder to convert the .gguf file again")
        source = info.get("source")
        return {"kind": "gguf", "tensor_types": {str(k): v for k, v in types.items()},
                "source": source if isinstance(source, str) else None}
    return None


def run_method(path: str | Path) -> str | None:
    """The training method ("opd", "opsd", "sft", "rl") of the opdlab run a checkpoint path belongs to:
    the run folder itself, its final/ or final-fp32/, or one of its checkpoints/step-N. Read from the
    run's run.json, else its config.yaml; None for anything that is not an opdlab run."""
    p = Path(path)
    for folder in (p, p.parent, p.parent.parent):
        if not (folder / "config.yaml").is_file():
            continue
        for name in ("run.json", "config.yaml"):
            try:
                text = (folder / name).read_text(encoding="utf-8")
                record = json.loads(text) if name == "run.json" else yaml.safe_load(text)
            except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
                continue  # missing or damaged: try the other file
            method = record.get("method") if isinstance(record, dict) else None
            if isinstance(method, str):
                return method
        return None
    return None


@dataclass
class Matching:
    """How the tensors of two checkpoints line up."""

    names: list[str]  # present in both with compatible shapes
    rows: dict[str, int]  # names compared on their first N rows only (padded vocabularies)
    missing_in_tuned: list[str]
    missing_in_base: list[str]
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def problems(self) -> list[str]:
        out = [f"{n} (only in base)" for n in self.missing_in_tuned]
        out += [f"{n} (only in tuned)" for n in self.missing_in_base]
        out += [f"{n} (shape {list(a)} vs {list(b)})" for n, a, b in self.shape_mismatch]
        return out


def match_tensors(base: Checkpoint, tuned: Checkpoint, skip_mismatched: bool = False) -> Matching:
    """Pair tensors by canonical name; padded vocabularies compare on shared rows.

    Raises `UserError` listing the problems unless `skip_mismatched`.
    """
    names, rows, mismatch = [], {}, []
    tuned_names = set(tuned.names())
    base_names = set(base.names())
    for name in base.names():
        if name not in tuned_names:
            continue
        a, b = base.shape(name), tuned.shape(name)
        if a == b:
            names.append(name)
        elif len(a) == len(b) == 2 and a[1] == b[1] and _VOCAB_NAMES.search(name):
            names.append(name)
            rows[name] = min(a[0], b[0])
        else:
            mismatch.append((name, a, b))
    m = Matching(
        names=names,
        rows=rows,
        missing_in_tuned=[n for n in base.names() if n not in tuned_names],
        missing_in_base=[n for n in tuned.names() if n not in base_names],
        shape_mismatch=mismatch,
    )
    if m.problems and not skip_mismatched:
        shown = "; ".join(m.problems[:5]) + (f"; and {len(m.problems) - 5} more" if len(m.problems) > 5 else "")
        raise UserError(
            f"{base.path} vs {tuned.path}: {len(m.problems)} tensor(s) do not match: {shown}; "
            "pass --skip-mismatched to analyze the rest"
        )
    if not m.names:
        raise UserError(f"{base.path} vs {tuned.path}: no tensor names in common; are these the same architecture?")
    return m


@dataclass
class TensorPair:
    name: str
    source: torch.Tensor  # W, in the analysis dtype
    tuned: torch.Tensor  # W', in the analysis dtype


def iter_pairs(
    base: Checkpoint, tuned: Checkpoint, dtype: torch.dtype, matching: Matching | None = None
) -> Iterator[TensorPair]:
    """Yield (name, W, W') one pair at a time, both cast to `dtype`."""
    matching = matching or match_tensors(base, tuned)
    for name in matching.names:
        rows = matching.rows.get(name)
        sides = []
        for ck in (base, tuned):
            raw = ck.get(name, rows=rows)
            sides.append(checked_values(raw, raw.to(dtype), ck.location(name)[0], ck.location(name)[1]))
        yield TensorPair(name, *sides)


# ----------------------------------------------------------------------------- what the analysis can digest

# Magnitudes above this overflow the analysis' fp32 arithmetic (squares, sums over blocks of 2**23 entries).
MAX_ABS = 2.0 ** 50
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def analyzable(checkpoints: list[Checkpoint], names: list[str], keep_empty: bool = False) -> tuple[list[str], list[str]]:
    """(names the analysis can measure, the others with the reason): floating point and (unless
    `keep_empty`) at least one element in every checkpoint. A UserError when none is left."""
    keep, skipped = [], []
    for name in names:
        dtypes = sorted({ck.dtype(name) for ck in checkpoints})
        if not set(dtypes) <= FLOAT_DTYPES:
            skipped.append(f"{name} (not floating point: {'/'.join(dtypes)})")
        elif not keep_empty and any(ck.numel(name) == 0 for ck in checkpoints):
            skipped.append(f"{name} (no elements)")
        else:
            keep.append(name)
    if not keep:
        shown = " vs ".join(str(ck.path) for ck in checkpoints)
        raise UserError(f"{shown}: no floating-point tensors with elements to measure "
                        f"({len(skipped)} skipped, e.g. {skipped[0] if skipped else 'none'}); pass model checkpoints")
    return keep, skipped


def checked_values(raw: torch.Tensor, cast: torch.Tensor, where: Path, key: str) -> torch.Tensor:
    """`cast` (rows of tensor `key` of file `where`, in the analysis dtype) when every value is finite and
    at most MAX_ABS in magnitude; else a UserError naming the tensor: non-finite values in the file,
    values the analysis dtype cannot hold, or values too large for the analysis' fp32 arithmetic."""
    if cast.numel() == 0 or not cast.is_floating_point():
        return cast
    lo, hi = torch.aminmax(cast)  # one pass; NaN propagates
    top = max(-float(lo), float(hi))
    if top <= MAX_ABS:
        return cast
    bad = int((~torch.isfinite(raw)).sum()) if raw.is_floating_point() else 0
    if bad:
        raise UserError(f"{where}: tensor '{key}' holds {bad} NaN or infinite value(s); the analysis cannot "
                        "measure it; fix or re-save the checkpoint")
    peak = float(raw.double().abs().max())
    name = _DTYPE_NAMES.get(cast.dtype, str(cast.dtype).removeprefix("torch."))
    if not math.isfinite(top):  # finite in the file, infinite once cast
        hint = "analyze with --dtype fp32" if name == "bf16" and peak < torch.finfo(torch.float32).max else "rescale it"
        raise UserError(f"{where}: tensor '{key}' holds values up to {peak:.3g}, beyond the range of {name}; {hint}")
    raise UserError(f"{where}: tensor '{key}' holds values up to {peak:.3g}, too large for the analysis "
                    f"(its squares and sums overflow fp32 above {MAX_ABS:.3g}); rescale it")


def read_checked(where: Path, key: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of tensor `key` in file `where`, cast to `dtype` and checked (`checked_values`)."""
    raw = read_rows(where, key, start, stop)
    return checked_values(raw, raw.to(dtype), where, key)
