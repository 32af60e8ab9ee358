"""Masked OPD training against dense OPD: peak memory of the training process and time per step.

    python bench/bench_masked_training.py                     # ~32 M-parameter student from a config
    python bench/bench_masked_training.py --real              # SmolLM2-135M-Instruct (needs opdlab[real])
    python bench/bench_masked_training.py --size tiny --trials 1 --steps 1 --warmup 0 --out /tmp/m.json   # smoke run

Configurations: dense (`opdlab distill` without a mask) and masked at each `--densities`
(default 1 %, 5 %, 20 %): `optim.mask` = a mask drawn independently per coordinate at that density
in every tensor, so every tensor is partially masked (the scattered case; real update masks touch
every tensor too). Masked runs use compact gradients (no dense gradient kept between micro-batches
or steps; docs/subnetworks.md). Everything else is the same: model, prompts, seed, batch, 2
micro-batches per step (gradient accumulation), AdamW, clipping, fp32 on CPU, one torch thread.

Each (configuration, trial) runs `opdlab.distill.train.train` in a fresh child process, so its peak
RSS (`ru_maxrss`, read by the child at its end) belongs to that one training process: loading,
evaluation, `--warmup` + `--steps` steps, the last step's checkpoint and final/ included. The
parent imports no torch and builds the models in a child of its own, so the children do not
inherit a large peak mark. Trials are interleaved: each round runs every configuration once, in an
order rotated by the round, so load from other processes hits all alike. Step time = rollout +
scoring + update of the timed steps (from the run's metrics.jsonl), mean per trial.

Reported per density: `peak_memory_ratio_masked_to_dense` and `step_time_ratio_masked_to_dense`
(median over rounds of the paired per-round ratio, with min and max), the same for the memory
above the child's RSS after imports (`peak_memory_above_start_ratio_masked_to_dense`) and for the
update part of the step alone; and whether the targets hold (peak memory <= 0.6x, step time <= 1x).

`--real`: the student is SmolLM2-135M-Instruct and, as in `opdlab demo --real`, its own teacher
with the answer in its prompt (method opsd, task chat-subtraction; there is no second model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "lib"))

from bench_train import PREFIX, QUIET, bench_tokenizer, emit, peak_rss_mb, rss_mb, versions  # noqa: E402
from provenance import keep_history, machine  # noqa: E402

REAL_MODEL = "smollm2-135m-instruct"
SIZES: dict[str, dict[str, Any]] = {
    # vocab; student / teacher: (hidden, layers, intermediate, heads, kv_heads)
    "tiny": {"vocab": 512, "student": (64, 2, 176, 4, 2), "teacher": (32, 1, 64, 2, 1)},
    "default": {"vocab": 8192, "student": (512, 8, 1408, 8, 4), "teacher": (256, 4, 704, 4, 2)},
}
TARGETS = {"peak_memory_ratio_max": 0.6, "step_time_ratio_max": 1.0, "at_densities_up_to": 0.2}


# ----------------------------------------------------------------------------- children


def build(workdir: Path, size: str, real: bool, densities: list[float], seed: int) -> dict[str, Any]:
    """Models (unless --real), prompts and one mask file per density; returns their paths."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opdlab.analysis.pairs import Checkpoint
    from opdlab.subnet.masks import mask_metadata, save_mask

    paths: dict[str, Any] = {"masks": {}}
    if real:
        from opdlab.models.gguf import as_gguf_folder

        paths["student"] = paths["teacher"] = REAL_MODEL
        shapes_from = Checkpoint(as_gguf_folder(REAL_MODEL, "student"))
    else:
        spec = SIZES[size]
        tok = bench_tokenizer(spec["vocab"])
        for offset, role in enumerate(("student", "teacher")):
            hidden, layers, inter, heads, kv = spec[role]
            cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=hidden, num_hidden_layers=layers,
                              intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                              max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            torch.manual_seed(seed + offset)
            model = LlamaForCausalLM(cfg)
            model.generation_config.eos_token_id = tok.eos_token_id
            model.save_pretrained(workdir / role)
            tok.save_pretrained(workdir / role)
            paths[role] = str(workdir / role)
        rng = random.Random(seed)
        prompts = workdir / "prompts.jsonl"
        with prompts.open("w") as f:
            for _ in range(256):
                f.write(json.dumps({"prompt": f"add:{rng.randrange(1000):03d}+{rng.randrange(1000):03d}"}) + "\n")
        paths["prompts"] = str(prompts)
        shapes_from = Checkpoint(workdir / "student")
    shapes = {name: shapes_from.shape(name) for name in shapes_from.names()}
    paths["parameters"] = sum(int(torch.Size(s).numel()) for s in shapes.values())
    paths["mask_density_measured"] = {}
    for d in densities:
        g = torch.Generator().manual_seed(seed + int(d * 1e6))
        masks = {name: torch.rand(shape, generator=g) < d for name, shape in shapes.items()}
        path = workdir / f"mask-{d:g}.safetensors"
        save_mask(path, masks, mask_metadata("random", masks, seed=seed))
        paths["masks"][str(d)] = str(path)
        paths["mask_density_measured"][str(d)] = sum(int(m.sum()) for m in masks.values()) / paths["parameters"]
    return paths


def run_config(paths: dict[str, Any], s: dict[str, Any], mask: str | None, run_dir: Path) -> Any:
    from opdlab.config import DistillConfig, load_config

    common = {
        "out": str(run_dir), "model.student": paths["student"], "data.num_eval": 1,
        "rollout.prompts_per_step": s["prompts_per_step"], "rollout.samples_per_prompt": 1,
        "rollout.max_new_tokens": s["max_new_tokens"], "rollout.micro_batch": s["micro_batch"],
        "optim.optimizer": "adamw", "optim.lr": s["lr"], "optim.weight_decay": 0.0, "optim.grad_clip": 1.0,
        "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.mask": mask,
        "run.steps": s["warmup"] + s["steps"], "run.seed": s["seed"], "run.eval_every": 0, "run.save_every": 0,
        "run.save_dtype": "fp32", "run.threads": s["threads"],
    }
    if s["real"]:
        common.update({"method": "opsd", "data.task": "chat-subtraction"})
    else:
        common.update({"method": "opd", "model.teacher": paths["teacher"], "data.prompts": paths["prompts"],
                       "loss.loss": "reverse_kl"})
    return load_config(DistillConfig, None, common)


def trial(paths: dict[str, Any], s: dict[str, Any], config: str) -> dict[str, Any]:
    """One training run in this (fresh) process; its timed steps and this process's peak RSS."""
    import torch

    from opdlab.distill.train import train

    torch.set_num_threads(s["threads"])
    start_mb = rss_mb()
    mask = None if config == "dense" else paths["masks"][config]
    with tempfile.TemporaryDirectory(prefix="bench-masked-") as tmp:
        t0 = time.perf_counter()
        train(run_config(paths, s, mask, Path(tmp)), Path(tmp), progress=False)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"rollout_s": r["time/rollout_s"], "score_s": r["time/score_s"], "update_s": r["time/update_s"],
              "step_s": r["time/rollout_s"] + r["time/score_s"] + r["time/update_s"],
              "tokens": r["train/completion_tokens"]}
             for r in rows if r.get("step", 0) > s["warmup"] and "time/update_s" in r]
    return {"config": config, "steps": steps, "wall_s": wall, "rss_at_start_mb": start_mb, "peak_rss_mb": peak_rss_mb()}


def child(kind: str, args: list[str]) -> dict[str, Any]:
    """Run this script as a child process doing `kind`; return the one result line it prints."""
    env = {**os.environ, **QUIET, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX):])
    raise RuntimeError(f"{kind} child exited with code {proc.returncode} without a result (see stderr)")


# ----------------------------------------------------------------------------- the parent


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: dict[str, list[dict[str, Any]]], densities: list[float]) -> dict[str, Any]:
    """Per configuration: peak RSS and step time over trials; per density: paired ratios to dense."""
    def step_mean(r: dict[str, Any], key: str = "step_s") -> float:
        return sum(x[key] for x in r["steps"]) / len(r["steps"])

    configs = {}
    for name, rs in runs.items():
        configs[name] = {
            "peak_rss_mb": _spread([r["peak_rss_mb"] for r in rs]),
            "rss_at_start_mb": _spread([r["rss_at_start_mb"] for r in rs]),
            "step_s": _spread([step_mean(r) for r in rs]),
            "update_s": _spread([step_mean(r, "update_s") for r in rs]),
            "rollout_s": _spread([step_mean(r, "rollout_s") for r in rs]),
            "score_s": _spread([step_mean(r, "score_s") for r in rs]),
        }
    per_density = []
    dense = runs["dense"]
    for d in densities:
        masked = runs[str(d)]
        mem = [m["peak_rss_mb"] / b["peak_rss_mb"] for m, b in zip(masked, dense)]
        above = [(m["peak_rss_mb"] - m["rss_at_start_mb"]) / (b["peak_rss_mb"] - b["rss_at_start_mb"])
                 for m, b in zip(masked, dense)]
        step = [step_mean(m) / step_mean(b) for m, b in zip(masked, dense)]
        update = [step_mean(m, "update_s") / step_mean(b, "update_s") for m, b in zip(masked, dense)]
        row = {"density": d,
               "peak_memory_ratio_masked_to_dense": _spread(mem),
               "peak_memory_above_start_ratio_masked_to_dense": _spread(above),
               "step_time_ratio_masked_to_dense": _spread(step),
               "update_time_ratio_masked_to_dense": _spread(update)}
        if d <= TARGETS["at_densities_up_to"]:
            row["meets_memory_target"] = row["peak_memory_ratio_masked_to_dense"]["median"] <= TARGETS["peak_memory_ratio_max"]
            row["meets_time_target"] = row["step_time_ratio_masked_to_dense"]["median"] <= TARGETS["step_time_ratio_max"]
        per_density.append(row)
    return {"configs": configs, "densities": per_density}


def table(report: dict[str, Any]) -> str:
    c = report["summary"]["configs"]
    lines = ["| configuration | peak RSS MB median [min–max] | step s | update s | masked/dense peak memory "
             "| above start | masked/dense step time | update time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    dense = c["dense"]
    lines.append(f"| dense | {dense['peak_rss_mb']['median']:,.0f} [{dense['peak_rss_mb']['min']:,.0f}–"
                 f"{dense['peak_rss_mb']['max']:,.0f}] | {dense['step_s']['median']:.2f} | {dense['update_s']['median']:.2f} "
                 "| 1 | 1 | 1 | 1 |")
    for row in report["summary"]["densities"]:
        x = c[str(row["density"])]
        r = {k: row[k] for k in ("peak_memory_ratio_masked_to_dense", "peak_memory_above_start_ratio_masked_to_dense",
                                 "step_time_ratio_masked_to_dense", "update_time_ratio_masked_to_dense")}
        cells = " | ".join(f"{v['median']:.2f} [{v['min']:.2f}–{v['max']:.2f}]" for v in r.values())
        lines.append(f"| masked {row['density']:.0%} | {x['peak_rss_mb']['median']:,.0f} [{x['peak_rss_mb']['min']:,.0f}–"
                     f"{x['peak_rss_mb']['max']:,.0f}] | {x['step_s']['median']:.2f} | {x['update_s']['median']:.2f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="default", help="model built from a config (ignored with --real)")
    ap.add_argument("--real", action="store_true", help=f"train {REAL_MODEL} instead (needs opdlab[real])")
    ap.add_argument("--densities", default="0.01,0.05,0.2", help="comma-separated mask densities")
    ap.add_argument("--trials", type=int, default=5, help="rounds; each runs every configuration once")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per trial")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each trial")
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch (8 / 4 = 2 accumulated)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the generated models and masks go (default: a temp folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "masked_training.json"))
    ap.add_argument("--worker", choices=("build", "trial"), help=argparse.SUPPRESS)
    ap.add_argument("--payload", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    densities = [float(x) for x in args.densities.split(",") if x]
    if args.worker:
        p = json.loads(args.payload)
        if args.worker == "build":
            emit(build(Path(p["workdir"]), p["size"], p["real"], p["densities"], p["seed"]))
        else:
            emit(trial(p["paths"], p["settings"], p["config"]))
        return {}

    from opdlab.fileio import write_json

    os.environ.update(QUIET)
    settings = {"real": args.real, "size": None if args.real else args.size, "prompts_per_step": args.prompts_per_step,
                "micro_batch": args.micro_batch, "max_new_tokens": args.max_new_tokens, "lr": args.lr,
                "threads": args.threads, "seed": args.seed, "trials": args.trials, "steps": args.steps,
                "warmup": args.warmup, "densities": densities}
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    configs = ["dense"] + [str(d) for d in densities]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="bench-masked-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        paths = child("build", ["--payload", json.dumps({"workdir": str(workdir), "size": args.size, "real": args.real,
                                                         "densities": densities, "seed": args.seed})])
        for t in range(args.trials):
            order = configs[t % len(configs):] + configs[:t % len(configs)]
            for config in order:
                r = child("trial", ["--payload", json.dumps({"paths": paths, "settings": settings, "config": config})])
                runs[config].append(r)
                step = sum(x["step_s"] for x in r["steps"]) / max(1, len(r["steps"]))
                print(f"trial {t + 1}/{args.trials} {config:>6}: peak RSS {r['peak_rss_mb']:,.0f} MB, "
                      f"step {step:.2f} s", flush=True)
    report = {
        "schema": 1, "benchmark": "masked_training",
        "command": "python bench/bench_masked_training.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(load_start),
        "versions": versions(),
        "settings": {**settings, "model": REAL_MODEL if args.real else SIZES[args.size],
                     "parameters": paths["parameters"], "mask_density_measured": paths["mask_density_measured"],
                     "method": "opsd (its own teacher, task chat-subtraction)" if args.real else "opd, loss reverse_kl",
                     "optimizer": "AdamW, constant lr, weight_decay 0, grad clip 1.0",
                     "masks": "independent per coordinate at the density, in every tensor",
                     "dtype": "float32", "device": "cpu", "save_dtype": "fp32"},
        "targets": TARGETS,
        "summary": summarize(runs, densities),
        "runs": runs,
        "wall_s": time.perf_counter() - t0,
    }
    report = keep_history(args.out, report, lambda previous: (previous.get("summary") or {}).get("densities"))
    write_json(args.out, report)
    print(table(report))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
