"""Stream tensor pairs of two checkpoints through `analyze_tensor`, with a progress bar.

Example::

    pair = open_pair("base/", "runs/opd", dtype="bf16")
    results = run_tensors(pair.specs, exact_svd_max=1024, device="cpu", workers=1)
"""

from __future__ import annotations

import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from opdlab.analysis.blocks import tensor_info
from opdlab.analysis.pairs import Checkpoint, analyzable, match_tensors, read_checked, source_format
from opdlab.analysis.per_tensor import BLOCK_ELEMS, TensorResult, TensorSpec, analyze_tensor

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class OpenedPair:
    base: Checkpoint
    tuned: Checkpoint
    specs: list[TensorSpec]
    skipped: list[str] = field(default_factory=list)  # mismatched or non-float tensors, with the reason
    fp32: bool = False  # whether the precision control has fp32 weights of both sides
    base_format: dict | None = None  # pairs.source_format of the base (e.g. a dequantized GGUF), else None


def _reader(a: Checkpoint, b: Checkpoint, name: str, dtype: torch.dtype):  # noqa: ANN202 - closure
    fa, ka = a.location(name)
    fb, kb = b.location(name)

    def read(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_checked(fa, ka, start, stop, dtype), read_checked(fb, kb, start, stop, dtype)

    return read


def _all_fp32(ck: Checkpoint, names: list[str]) -> bool:
    return all(tensor_info(*ck.location(n))[0] == "F32" for n in names)


def open_pair(base: str | Path, tuned: str | Path, dtype: str, skip_mismatched: bool = False,
              precision_control: bool = True) -> OpenedPair:
    """Open both checkpoints, match their tensors and build one `TensorSpec` per pair.

    With `precision_control`, fp32 weights are looked up for both sides (an opdlab run's
    `final-fp32/`, or the checkpoint itself when it is stored in fp32); when both exist,
    every spec also reads them.
    """
    # An fp32 analysis reads fp32 weights where they exist (an opdlab run's final-fp32/): casting a
    # bf16 checkpoint up would measure bf16 storage, not the fp32 update.
    b, t = Checkpoint(base, prefer_fp32=dtype == "fp32"), Checkpoint(tuned, prefer_fp32=dtype == "fp32")
    matching = match_tensors(b, t, skip_mismatched=skip_mismatched)
    names, skipped = analyzable([b, t], matching.names)
    skipped = list(matching.problems) + skipped
    b32 = t32 = None
    if precision_control:
        b32, t32 = Checkpoint(base, prefer_fp32=True), Checkpoint(tuned, prefer_fp32=True)
        if not (_all_fp32(b32, names) and _all_fp32(t32, names)):
            b32 = t32 = None
    torch_dtype = DTYPES[dtype]
    specs = []
    for name in names:
        shape = list(b.shape(name))
        if name in matching.rows:
            shape[0] = matching.rows[name]
        read32 = _reader(b32, t32, name, torch.float32) if b32 is not None and t32 is not None else None
        specs.append(TensorSpec(name, tuple(shape), _reader(b, t, name, torch_dtype), read32))
    return OpenedPair(b, t, specs, skipped, fp32=b32 is not None, base_format=source_format(b))


def _return_freed_memory() -> None:
    """Give freed heap memory back to the OS between tensors (glibc keeps it otherwise).

    Why: glibc raises its mmap threshold after large frees, so later 1–32 MB tensors come from
    per-thread heaps that are never shrunk; peak RSS then grows with the number of tensors
    seen rather than with the largest one. Best effort: a no-op off glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _limit_heap_growth() -> None:
    """Serve allocations of 4 MB and more from mmap, returned to the OS when freed (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD; also stops its dynamic growth
    except (OSError, AttributeError):
        pass


def default_workers(device: str, processes: int = 1) -> int:
    """Tensors in flight when the user asks for automatic (0): on CPU one per core (at most 4),
    the cores shared among `processes` analysis processes on this machine; 1 on GPU."""
    if not device.startswith("cpu"):
        return 1
    return max(1, min(4, (os.cpu_count() or 1) // max(1, processes)))


def tensor_cost(shape: tuple[int, ...], exact_svd_max: int) -> float:
    """Relative time to analyse one tensor pair, to share tensors out across processes.

    Fitted on the Qwen2.5-0.5B shapes (one core): Grams and reconstructions grow as
    numel·min(m, n), the three eigendecompositions as min(m, n)³, selections as numel.
    """
    numel = 1
    for d in shape:
        numel *= d
    if len(shape) < 2:
        return float(numel)
    n_t = min(shape[0], numel // max(1, shape[0]))
    if n_t > exact_svd_max:  # randomized: a few passes of rank-0.2·n_t products
        return float(numel) * (0.2 * n_t + 50)
    return float(numel) * (n_t + 50) + 5.0 * n_t**3


def run_tensors(specs: list[TensorSpec], exact_svd_max: int, device: str = "cpu", workers: int = 0,
                progress: bool = True, block_elems: int = BLOCK_ELEMS) -> list[TensorResult]:
    """Analyse every spec (a progress bar per tensor on stderr); results in the specs' order."""
    workers = workers or default_workers(device)
    # With several tensors in flight each runs single-threaded: on a busy machine multi-threaded
    # kernels on small tensors spend most of their time waiting at barriers (measured: a
    # 21-tensor tiny model took 35 s with 2 intra-op threads vs 4.6 s with 1 on a loaded 2-core box).
    threads_before = torch.get_num_threads()
    _limit_heap_growth()
    if workers > 1:
        torch.set_num_threads(1)
    bar = tqdm(total=len(specs), desc="analyze", unit="tensor", file=sys.stderr, disable=not progress)
    results: dict[str, TensorResult] = {}
    try:
        if workers <= 1:
            for spec in specs:
                bar.set_postfix_str(spec.name[-40:], refresh=False)
                results[spec.name] = analyze_tensor(spec, exact_svd_max, device, block_elems)
                _return_freed_memory()
                bar.update(1)
        else:
            # Largest first, so the pool does not end waiting on one big tensor.
            order = sorted(specs, key=lambda s: -_numel(s.shape))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(analyze_tensor, s, exact_svd_max, device, block_elems): s for s in order}
                for fut in as_completed(futures):
                    res = fut.result()
                    results[res.name] = res
                    _return_freed_memory()
                    bar.set_postfix_str(res.name[-40:], refresh=False)
                    bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    return [results[s.name] for s in specs]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
