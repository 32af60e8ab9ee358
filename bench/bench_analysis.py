"""Benchmark `opdlab analyze` against the study's own analysis script on a Qwen2.5-0.5B-shaped pair.

    python bench/bench_analysis.py --reference ~/OPD-Param-Analysis/scripts/analyze_opd_delta.py
    python bench/bench_analysis.py --pair /data/pair --reference …   # reuse a generated pair (base/, tuned/)
    python bench/bench_analysis.py --size small                      # opdlab alone, seconds (smoke test)

Generates a bf16 pair with the tensor shapes of Qwen2.5-0.5B (vocab 151936, hidden 896,
24 layers, intermediate 4864, 14 heads, 2 KV heads, head_dim 64, tied embeddings): random
weights plus a planted update on 10 % of the coordinates. Then runs, one after the other and
each in a fresh child process so that wall time, CPU time and peak RSS (os.wait4's rusage)
belong to it alone:
  1. `python -m opdlab analyze BASE TUNED --out …` (defaults);
  2. with `--reference PATH`: the study's released script (SydCS/OPD-Param-Analysis,
     `scripts/analyze_opd_delta.py`; never copied into this repository — pass your clone's
     path) with `--src_model BASE --opd_model TUNED --out_dir … --device DEVICE` and its
     defaults otherwise. It needs pandas (`pip install pandas`); `--reference-python` picks
     another interpreter for it.
Then compares every per-tensor metric the two share (bench/lib/analysis_agreement.py: the study's
CSV columns mapped to opdlab's tensors.csv columns; differences of the low-magnitude masks also in
units of the study's tie-break spread; the middle layer's matrices against a full fp64 SVD) and
writes times, memories, the agreement table and the machine to bench/results/analysis.json
(analysis_small.json for --size small).
"""

from __future__ import annotations

import argparse
import hashlib
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

sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
from analysis_agreement import NOT_SHARED, add_tie_z, agreement, fp64_check, summarize, tie_spread  # noqa: E402

SIZES = {
    # name: vocab, hidden, layers, intermediate, heads, kv_heads, head_dim
    "0.5b": (151936, 896, 24, 4864, 14, 2, 64),
    "small": (4096, 128, 2, 512, 4, 2, 32),
}
TARGET_SPEEDUP = 10.0  # opdlab vs the study's script, wall time
TARGET_AGREEMENT = 0.01  # relative, every shared per-tensor metric


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


# ----------------------------------------------------------------------------- running and measuring

def run_child(cmd: list[str], cwd: Path | None = None) -> dict:
    """Run `cmd`; its wall seconds, CPU seconds (user + system) and own peak RSS."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"child failed: {' '.join(cmd)}\n{err.read().decode(errors='replace')[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss is in KiB on Linux


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--reference", default=None, metavar="PATH",
                    help="the study's analyze_opd_delta.py: run it as the baseline on the same pair")
    ap.add_argument("--reference-python", default=sys.executable, help="interpreter for the reference script")
    ap.add_argument("--device", default="cpu", help="device for both sides (cpu, cuda)")
    ap.add_argument("--workdir", default=None, help="where the generated pair and outputs go (default: a temp folder)")
    ap.add_argument("--pair", default=None, help="reuse a pair generated before (folder with base/ and tuned/)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs of both sides in the work folder")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/analysis[_small].json)")
    ap.add_argument("--generate-only", default=None, metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.generate_only:  # the child that writes the pair (see below)
        generate_pair(Path(args.generate_only), args.size)
        return {}
    reference = Path(args.reference).resolve() if args.reference else None
    if reference is not None and not reference.is_file():
        ap.error(f"--reference {args.reference}: no such file (pass the path of analyze_opd_delta.py)")
    load_start = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="opdlab-bench-", dir=args.workdir)
    root = Path(tmp)
    t = time.perf_counter()
    if args.pair:
        base, tuned = Path(args.pair) / "base", Path(args.pair) / "tuned"
    else:
        # In a child process: a child's peak RSS starts from its parent's RSS at fork (Linux keeps the
        # high-water mark across exec), so a parent that had held the generated weights would inflate it.
        run_child([sys.executable, str(Path(__file__).resolve()), "--generate-only", str(root), "--size", args.size])
        base, tuned = root / "base", root / "tuned"
    gen_s = time.perf_counter() - t
    ckpt_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    shapes = qwen2_shapes(args.size)
    largest_mb = max(math.prod(s) for s in shapes.values()) * 2 / 2**20

    opd = run_child([sys.executable, "-m", "opdlab", "analyze", str(base), str(tuned), "--out", str(root / "opdlab"),
                     "--device", args.device])
    summary = json.loads((root / "opdlab" / "analysis.json").read_text())["summary"]
    ref = agree = None
    if reference is not None:
        ref = run_child([args.reference_python, str(reference), "--src_model", str(base), "--opd_model", str(tuned),
                         "--out_dir", str(root / "reference"), "--device", args.device], cwd=reference.parent)
        ref["script"] = str(reference)
        ref["script_sha256"] = hashlib.sha256(reference.read_bytes()).hexdigest()
        table = agreement(root / "opdlab", root / "reference")
        names = list(qwen2_shapes(args.size))
        add_tie_z(table, root / "opdlab", root / "reference", tie_spread(base, tuned, names))
        mid = f"model.layers.{SIZES[args.size][2] // 2}."
        sample = [n for n in names if n.startswith(mid) and n.endswith("proj.weight")]
        agree = {"summary": summarize(table, TARGET_AGREEMENT), "table": table, "not_shared": NOT_SHARED,
                 "fp64_check": fp64_check(base, tuned, sample, root / "opdlab", root / "reference")}
    speedup = round(ref["wall_s"] / opd["wall_s"], 2) if ref else None
    result = {
        "benchmark": "analysis",
        "command": " ".join(["python", "bench/bench_analysis.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d"),
        "size": args.size,
        "shapes": {"vocab": SIZES[args.size][0], "hidden": SIZES[args.size][1], "layers": SIZES[args.size][2],
                   "intermediate": SIZES[args.size][3], "num_tensors": len(shapes),
                   "num_params": sum(math.prod(s) for s in shapes.values())},
        "checkpoint_mb": round(ckpt_mb, 1),
        "largest_tensor_mb_bf16": round(largest_mb, 1),
        "generate_s": round(gen_s, 1),
        "opdlab": opd,
        "reference": ref,
        "speedup": speedup,
        "memory_ratio": round(ref["peak_rss_mb"] / opd["peak_rss_mb"], 2) if ref else None,
        "targets": {"speedup_at_least": TARGET_SPEEDUP, "agreement_within": TARGET_AGREEMENT,
                    "opdlab_peak_rss_below_mb": round(ckpt_mb, 1)},
        "met": {"speedup": speedup >= TARGET_SPEEDUP if speedup else None,
                "agreement": agree["summary"]["all_within"] if agree else None,
                "memory": opd["peak_rss_mb"] < ckpt_mb},
        "agreement": agree,
        "opdlab_summary": {k: summary[k] for k in ("sparsity", "relative_update_norm", "median_rank_fraction_tol_1e-05",
                                                   "principal_energy_both_rho_0.1", "svd_methods")},
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "load_avg_at_start": load_start, "load_avg_at_end": os.getloadavg()},
        "settings": {"opdlab": "defaults (bf16, exact_svd_max 1024, workers auto)",
                     "reference": "defaults (bf16, max_exact_svd_dim 4096)" if ref else None,
                     "device": args.device, "density": 0.1},
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "analysis.json" if args.size == "0.5b" else "analysis_small.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("opdlab", "reference", "speedup", "memory_ratio", "met")}, indent=2))
    if agree:
        print(json.dumps(agree["summary"], indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
