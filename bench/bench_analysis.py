"""Benchmark `opdlab analyze` against the straightforward analysis on a Qwen2.5-0.5B-shaped pair.

    python bench/bench_analysis.py                 # 0.5B shapes (minutes; ~2 GB of temp files)
    python bench/bench_analysis.py --size small    # a few seconds, for a smoke test

Generates a bf16 pair with the tensor shapes of Qwen2.5-0.5B (vocab 151936, hidden 896,
24 layers, intermediate 4864, 14 heads, 2 KV heads, head_dim 64, tied embeddings): random
weights plus a planted update on 10 % of the coordinates. Then runs, each in a fresh child
process so wall time and peak RSS (os.wait4's ru_maxrss) belong to it alone:
  1. `python -m opdlab analyze BASE TUNED --out …` (defaults);
  2. the naive baseline: both state dicts loaded whole, a full `torch.linalg.svd` of W, W'
     and Δ for every matrix, dense rank-r reconstructions per ρ and sort-based masks —
     the same metric families, computed the straightforward way.
Writes bench/results/analysis.json (or analysis_small.json) with machine, versions, settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    # name: vocab, hidden, layers, intermediate, heads, kv_heads, head_dim
    "0.5b": (151936, 896, 24, 4864, 14, 2, 64),
    "small": (4096, 128, 2, 512, 4, 2, 32),
}
RHOS = (0.01, 0.05, 0.1, 0.2)


def qwen2_shapes(size: str) -> dict[str, tuple[int, ...]]:
    vocab, hidden, layers, inter, heads, kv, hd = SIZES[size]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.q_proj.bias": (heads * hd,),
            p + "self_attn.k_proj.weight": (kv * hd, hidden), p + "self_attn.k_proj.bias": (kv * hd,),
            p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.v_proj.bias": (kv * hd,),
            p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def generate_pair(folder: Path, size: str, density: float = 0.1, seed: int = 0) -> tuple[Path, Path]:
    """Write base/ and tuned/ (one model.safetensors each, bf16) and return their paths."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for name, shape in qwen2_shapes(size).items():
        if len(shape) == 1:
            w = 1.0 + 0.05 * torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        w = w.to(torch.bfloat16)
        # a planted update: 10 % of coordinates move by ~1 % of their tensor's scale (survives bf16)
        mask = torch.rand(shape, generator=g) < density
        step = 0.02 * w.float().abs().mean() * torch.randn(shape, generator=g).sign()
        w2 = torch.where(mask, (w.float() + step + 0.01 * w.float()).to(torch.bfloat16), w)
        base[name], tuned[name] = w, w2
    out = []
    for sub, tensors in (("base", base), ("tuned", tuned)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / sub / "model.safetensors"), metadata={"format": "pt"})
        out.append(folder / sub)
    return out[0], out[1]


# ----------------------------------------------------------------------------- the naive baseline

def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def naive_analysis(base: str, tuned: str, out: str, layers: int = 0) -> None:
    """The straightforward analysis (run in a child process by `main`).

    With `layers` > 0 only decoder layers below it (and every non-layer tensor) are analysed;
    per-tensor seconds are recorded so `main` can extrapolate to all layers.
    """
    from safetensors.torch import load_file

    start = time.perf_counter()
    a, b = load_file(str(Path(base) / "model.safetensors")), load_file(str(Path(tuned) / "model.safetensors"))
    rows, seconds = {}, {}
    for name, w_bf in a.items():
        layer = _layer(name)
        if layers and layer is not None and layer >= layers:
            continue
        t0 = time.perf_counter()
        w, w2 = w_bf.float(), b[name].float()
        d = w2 - w
        n = w.numel()
        r = {"sparsity": 1 - float((d != 0).sum()) / n, "rel": float(d.norm() / w.norm())}
        flat = (d * d).flatten()
        r["coord1"] = float(torch.topk(flat, max(1, math.ceil(0.01 * n))).values.sum() / flat.sum())
        if w.dim() == 2:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u2, s2, _ = torch.linalg.svd(w2, full_matrices=False)
            sd = torch.linalg.svd(d, full_matrices=False).S
            r["rank"] = float((sd > 1e-5 * sd[0]).sum()) / min(w.shape)
            r["top8"] = float((sd[:8] ** 2).sum() / (sd**2).sum())
            r["drift"] = float((s2 - s).norm() / s.norm())
            changed = d != 0
            for rho in RHOS:
                k = int(rho * min(w.shape))
                if k < 1:
                    continue
                uk, vk = u[:, :k], vh[:k].T
                r[f"both_{rho}"] = float((uk.T @ d @ vk).pow(2).sum() / flat.sum())
                r[f"rot_{rho}"] = float((1 - torch.linalg.svdvals(uk.T @ u2[:, :k]).clamp(max=1) ** 2).sqrt().mean())
                rec = ((uk * s[:k]) @ vh[:k]).abs().flatten()
                size = math.ceil(rho * n)
                top = torch.topk(rec, size).indices
                r[f"principal_{rho}"] = float(changed.flatten()[top].float().mean()) / max(1e-12, 1 - r["sparsity"])
                low = torch.topk(w.abs().flatten(), size, largest=False).indices
                r[f"low_{rho}"] = float(changed.flatten()[low].float().mean()) / max(1e-12, 1 - r["sparsity"])
        rows[name] = r
        seconds[name] = time.perf_counter() - t0
    Path(out).write_text(json.dumps({"rows": rows, "seconds": seconds, "total_s": time.perf_counter() - start}))


def _extrapolate(doc: dict, measured: dict, layers_run: int, layers_total: int) -> dict:
    """Naive wall time for every layer: measured − layer tensors' time + (total/run) × layer tensors' time."""
    layer_s = sum(s for n, s in doc["seconds"].items() if _layer(n) is not None)
    return {"layers_run": layers_run, "layer_tensor_s": round(layer_s, 2),
            "wall_s_extrapolated": round(measured["wall_s"] + (layers_total / layers_run - 1) * layer_s, 1),
            "peak_rss_note": "peak RSS of the partial run (a lower bound for the full run)"}


def _run_child(cmd: list[str]) -> dict:
    """Run `cmd`, returning wall seconds and the child's own peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {' '.join(cmd)}\n{err[-2000:]}")
    # ru_maxrss is in KiB on Linux
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--workdir", default=None, help="where the generated pair goes (default: a temp folder)")
    ap.add_argument("--skip-naive", action="store_true", help="time opdlab only")
    ap.add_argument("--naive-layers", type=int, default=0,
                    help="run the naive baseline on this many decoder layers (+ all other tensors) and "
                         "extrapolate its time linearly to every layer (0 = run it on everything)")
    ap.add_argument("--pair", default=None, help="reuse a pair generated before (folder with base/ and tuned/)")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/analysis[_small].json)")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="opdlab-bench-", dir=args.workdir)
    root = Path(tmp.name)
    t = time.perf_counter()
    if args.pair:
        base, tuned = Path(args.pair) / "base", Path(args.pair) / "tuned"
    else:
        base, tuned = generate_pair(root, args.size)
    gen_s = time.perf_counter() - t
    ckpt_mb = (base / "model.safetensors").stat().st_size / 2**20
    shapes = qwen2_shapes(args.size)
    largest_mb = max(math.prod(s) for s in shapes.values()) * 2 / 2**20

    opd = _run_child([sys.executable, "-m", "opdlab", "analyze", str(base), str(tuned), "--out", str(root / "out")])
    summary = json.loads((root / "out" / "analysis.json").read_text())["summary"]
    naive = None
    if not args.skip_naive:
        naive = _run_child([sys.executable, __file__, "--naive-child", str(base), str(tuned), str(root / "naive.json"),
                            str(args.naive_layers)])
        if args.naive_layers:
            naive.update(_extrapolate(json.loads((root / "naive.json").read_text()), naive, args.naive_layers,
                                      SIZES[args.size][2]))
    result = {
        "benchmark": "analysis",
        "size": args.size,
        "shapes": {"vocab": SIZES[args.size][0], "hidden": SIZES[args.size][1], "layers": SIZES[args.size][2],
                   "intermediate": SIZES[args.size][3], "num_tensors": len(shapes),
                   "num_params": sum(math.prod(s) for s in shapes.values())},
        "checkpoint_mb": round(ckpt_mb, 1),
        "largest_tensor_mb_bf16": round(largest_mb, 1),
        "generate_s": round(gen_s, 1),
        "opdlab": opd,
        "naive": naive,
        "speedup": round(naive.get("wall_s_extrapolated", naive["wall_s"]) / opd["wall_s"], 2) if naive else None,
        "opdlab_summary": {k: summary[k] for k in ("sparsity", "relative_update_norm", "median_rank_fraction_tol_1e-05",
                                                   "principal_energy_both_rho_0.1", "svd_methods")},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "load_avg_at_end": os.getloadavg()},
        "settings": {"opdlab": "defaults (bf16, exact_svd_max 1024, workers auto)", "density": 0.1,
                     "naive_layers": args.naive_layers or "all"},
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "analysis.json" if args.size == "0.5b" else "analysis_small.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    tmp.cleanup()
    return result


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--naive-child":
        naive_analysis(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
