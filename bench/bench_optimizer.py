"""Optimizer-state memory and step time: sparse-state (masked) AdamW vs torch.optim.AdamW.

    python bench/bench_optimizer.py                      # ~34 M-parameter Llama, writes bench/results/optimizer.json
    python bench/bench_optimizer.py --size tiny --trials 2 --steps 2 --out /tmp/o.json   # smoke run

One run measures every configuration on the same model and the same gradients:
torch AdamW (foreach=False, the CPU default), torch AdamW (foreach=True), and the masked AdamW
at mask densities 1 %, 5 %, 20 % and 100 %. Only `optimizer.step()` is timed (gradients are fixed
random tensors, so the forward/backward pass does not drown the difference). Trials are
interleaved round-robin across configurations so that load from other processes on a shared
machine hits all of them alike; each trial times `--steps` steps after two warm-up steps that
also create the state. Reported: median, min and max per-step time over trials, and the bytes
of the optimizer's state tensors (for the masked optimizer including its int32 indices).

Masks are drawn independently per coordinate (`rand < density`): the scattered worst case for
gather/scatter locality; masks from real updates are more clustered (whole rows, whole tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench" / "lib"))

from opdlab.fileio import write_json  # noqa: E402
from provenance import keep_history, machine  # noqa: E402
from opdlab.subnet.optimizers import MaskedAdamW, optimizer_state_bytes  # noqa: E402

SIZES = {
    # name: (hidden, layers, intermediate, heads, kv_heads, vocab)
    "tiny": (64, 2, 176, 4, 2, 512),
    "small": (256, 4, 704, 4, 2, 4096),
    "default": (512, 8, 1408, 8, 4, 8192),
}
DENSITIES = (0.01, 0.05, 0.20, 1.0)


def build_params(size: str, device: str, seed: int) -> list[torch.nn.Parameter]:
    """The parameters of a Llama built from a config (random init), with fixed random gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv, vocab = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def random_masks(params: list[torch.nn.Parameter], density: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(p.shape, generator=g) < density).to(p.device) for p in params]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per trial")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--weight-decay", type=float, default=0.01,
                    help="AdamW weight decay (nonzero takes the masked gather-decay-scatter path; 0 the index_add_ path)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "optimizer.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    params = build_params(args.size, args.device, args.seed)
    numel = sum(p.numel() for p in params)
    lr, wd = 1e-4, args.weight_decay

    makers: dict[str, tuple[float, Callable[[], torch.optim.Optimizer]]] = {
        "torch AdamW (foreach=False)": (1.0, lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False)),
        "torch AdamW (foreach=True)": (1.0, lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=True)),
    }
    masks_by_density = {d: random_masks(params, d, args.seed + 1) for d in DENSITIES}
    for d in DENSITIES:
        makers[f"masked AdamW {d:.0%}"] = (d, lambda d=d: MaskedAdamW(params, masks_by_density[d], lr=lr, weight_decay=wd))

    opts: dict[str, torch.optim.Optimizer] = {}
    rows: dict[str, dict] = {}
    for name, (d, make) in makers.items():
        t0 = time.perf_counter()
        opt = make()
        build_s = time.perf_counter() - t0
        for _ in range(2):  # warm-up; the first step creates the state
            opt.step()
        sync(args.device)
        nnz = sum(int(m.sum()) for m in masks_by_density[d]) if d < 1.0 else numel
        opts[name] = opt
        rows[name] = {"name": name, "density": d, "masked_coordinates": nnz, "state_bytes": optimizer_state_bytes(opt),
                      "build_s": build_s, "step_ms": []}

    for _ in range(args.trials):
        for name, opt in opts.items():
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            sync(args.device)
            rows[name]["step_ms"].append((time.perf_counter() - t0) / args.steps * 1e3)

    dense_state = rows["torch AdamW (foreach=False)"]["state_bytes"]
    dense_ms = statistics.median(rows["torch AdamW (foreach=False)"]["step_ms"])
    dense_foreach_ms = statistics.median(rows["torch AdamW (foreach=True)"]["step_ms"])
    results = []
    for row in rows.values():
        ms = row.pop("step_ms")
        exact_density = row["masked_coordinates"] / numel
        row.update({
            "exact_density": exact_density,
            "state_vs_density_x_dense": row["state_bytes"] / (exact_density * dense_state),
            "step_ms_median": statistics.median(ms), "step_ms_min": min(ms), "step_ms_max": max(ms),
            "step_ms_trials": ms,
            "step_time_vs_dense": statistics.median(ms) / dense_ms,
            "step_time_vs_dense_foreach": statistics.median(ms) / dense_foreach_ms,
        })
        results.append(row)

    report = {
        "schema": 1,
        "benchmark": "optimizer",
        "command": "python bench/bench_optimizer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine(load_start), "torch_threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": {"size": args.size, "model": dict(zip(("hidden", "layers", "intermediate", "heads", "kv_heads",
                                                           "vocab"), SIZES[args.size])),
                     "parameters": numel, "tensors": len(params), "dtype": "float32", "lr": lr,
                     "weight_decay": wd, "trials": args.trials, "steps_per_trial": args.steps,
                     "mask": "independent per coordinate (rand < density), seed " + str(args.seed + 1)},
        "results": results,
    }
    report = keep_history(args.out, report, lambda previous: {
        r["name"]: {"step_ms_median": round(r["step_ms_median"], 1), "state_bytes": r["state_bytes"]}
        for r in previous.get("results", [])})
    write_json(args.out, report)
    print(table(report))
    print(f"wrote {args.out}")
    return report


def table(report: dict) -> str:
    """A Markdown table of the results."""
    lines = ["| optimizer | density | state MiB | state / (density × dense) | step ms median [min–max] | vs dense | vs dense foreach |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['name']} | {r['exact_density']:.2%} | {r['state_bytes'] / 2**20:.1f} | "
                     f"{r['state_vs_density_x_dense']:.3f} | {r['step_ms_median']:.1f} "
                     f"[{r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}] | {r['step_time_vs_dense']:.2f}× | "
                     f"{r['step_time_vs_dense_foreach']:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
