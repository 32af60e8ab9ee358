"""Where one opdlab OPD step spends its time: cProfile over `train()` on the bench pair of a size.

    python bench/profile_train.py --size small          # -> bench/results/profile_small.json + a table on stdout
    python bench/profile_train.py --size medium --threads 1

Builds the same student/teacher pair as bench/bench_train.py, runs `--warmup` untimed steps, then
`--steps` more (a second `train` call that resumes from the warm-up checkpoint). The profiler is on
only inside steps: from the start of each roll-out to the step's metrics line, minus the final
evaluation, so model loading, evaluation and checkpoint writing stay out of it. Reports the
cumulative seconds per step of the functions that make up a step (generation and its sampling,
teacher scoring, the student's forward, the loss, backward, optimizer) and the top functions by
own time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT / "lib"))

import bench_train  # noqa: E402
from provenance import keep_history, machine  # noqa: E402

# (label, file fragment, function name): cumulative time of each, per step
PARTS = [
    ("step: roll out (generate + decode)", "distill/rollout.py", "roll_out"),
    ("  fast decoding (distill/decode.py)", "distill/decode.py", "decode"),
    ("    decode steps after the prefill", "distill/decode.py", "step"),
    ("  model.generate (other models)", "generation/utils.py", "generate"),
    ("  seeded sampler (SeededSampling.pick)", "distill/sampling.py", "pick"),
    ("  decode completions", "distill/rollout.py", "decode_completions"),
    ("step: teacher scoring", "distill/rollout.py", "score"),
    ("step: student + loss + backward (accumulate_gradients)", "distill/step.py", "accumulate_gradients"),
    ("  student/teacher forward (completion_logits)", "distill/rollout.py", "completion_logits"),
    ("  opd_loss", "distill/losses.py", "opd_loss"),
    ("  log_softmax_chunked", "distill/losses.py", "log_softmax_chunked"),
    ("  backward", "torch/_tensor.py", "backward"),
    ("step: clip_grad_norm_", "nn/utils/clip_grad.py", "clip_grad_norm_"),
    ("step: optimizer.step (AdamW)", "torch/optim/adam.py", "adam"),
]


def cumulative(stats: pstats.Stats) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for (filename, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        for _label, frag, fn in PARTS:
            if name == fn and filename.replace("\\", "/").endswith(frag):
                out[(frag, fn)] = out.get((frag, fn), 0.0) + ct
    return out


@contextlib.contextmanager
def profile_steps_only(profiler: cProfile.Profile) -> Iterator[None]:
    """Switch `profiler` on when a step's roll-out starts, off for evaluation and at the step's log line."""
    import opdlab.distill.train as train_mod

    originals = (train_mod.roll_out, train_mod.evaluate, train_mod.MetricsLog.write)

    def roll_out(*a: Any, **kw: Any) -> Any:
        profiler.enable()
        return originals[0](*a, **kw)

    def evaluate(*a: Any, **kw: Any) -> Any:
        profiler.disable()
        return originals[1](*a, **kw)

    def write(self: Any, row: dict) -> Any:
        profiler.disable()
        return originals[2](self, row)

    train_mod.roll_out, train_mod.evaluate, train_mod.MetricsLog.write = roll_out, evaluate, write  # type: ignore[method-assign]
    try:
        yield
    finally:
        profiler.disable()
        train_mod.roll_out, train_mod.evaluate, train_mod.MetricsLog.write = originals  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(bench_train.SIZES), default="small")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("fp32", "bf16-mixed"), default="fp32")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="default bench/results/profile_<size>.json")
    args = ap.parse_args(argv)

    import torch

    from opdlab.distill.train import train
    from opdlab.fileio import write_json

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    s = {"prompts_per_step": args.prompts_per_step, "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
         "lr": 1e-5, "threads": args.threads, "seed": 0,
         "precision": args.precision}
    with tempfile.TemporaryDirectory(prefix="profile-train-") as tmp:
        paths = bench_train.build_pair(Path(tmp) / "pair", args.size)
        params = paths.pop("params")
        run = Path(tmp) / "run"
        train(bench_train.opdlab_config(paths, s, args.warmup, str(run)), run, progress=False)
        cfg = bench_train.opdlab_config(paths, s, args.warmup + args.steps, str(run))
        profiler = cProfile.Profile()
        with profile_steps_only(profiler):
            train(cfg, run, resume_from=run / "checkpoints" / f"step-{args.warmup}", progress=False)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    stats = pstats.Stats(profiler)
    cum = cumulative(stats)
    timed = [r for r in rows if r.get("step", 0) > args.warmup and "time/rollout_s" in r]
    step_s = sum(r["time/rollout_s"] + r["time/score_s"] + r["time/update_s"] for r in timed) / len(timed)
    parts = [{"part": label, "seconds_per_step": cum.get((frag, fn), 0.0) / args.steps}
             for label, frag, fn in PARTS]
    top = []
    for (filename, line, name), (_cc, nc, tt, ct, _c) in sorted(
            stats.stats.items(), key=lambda kv: -kv[1][2])[:15]:  # type: ignore[attr-defined]
        top.append({"function": f"{Path(filename).name}:{line}({name})", "calls_per_step": nc / args.steps,
                    "own_s_per_step": tt / args.steps, "cumulative_s_per_step": ct / args.steps})
    report = {"schema": 1, "benchmark": "profile_train", "size": args.size, "parameters": params,
              "command": "python bench/profile_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(load_start),
              "settings": {**s, "steps": args.steps, "warmup": args.warmup},
              "versions": bench_train.versions(), "step_s_from_metrics": step_s,
              "tokens_per_step": sum(r["train/completion_tokens"] for r in timed) / len(timed),
              "parts": parts, "top_own_time": top}
    out = args.out or str(ROOT / "results" / f"profile_{args.size}.json")
    report = keep_history(out, report, lambda previous: {
        "step_s_from_metrics": previous.get("step_s_from_metrics"),
        "parts": {p["part"].strip(): round(p["seconds_per_step"], 4) for p in previous.get("parts", [])}})
    write_json(out, report)
    print(f"{args.size}: {step_s * 1e3:.0f} ms per step (metrics), {report['tokens_per_step']:.0f} completion tokens")
    print("| part | ms per step | share of step |\n|---|---:|---:|")
    for p in parts:
        print(f"| {p['part']} | {p['seconds_per_step'] * 1e3:.1f} | {p['seconds_per_step'] / step_s:.0%} |")
    print("\n| function (own time) | calls/step | own ms/step |\n|---|---:|---:|")
    for t in top[:10]:
        print(f"| `{t['function']}` | {t['calls_per_step']:.0f} | {t['own_s_per_step'] * 1e3:.1f} |")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
