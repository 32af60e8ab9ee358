"""Run every benchmark, one after the other, each writing its JSON into bench/results/.

    python bench/run_all.py                       # the full suite (about 40 min on 2 shared cores)
    python bench/run_all.py --only train,profile  # a subset
    python bench/run_all.py --quick --results /tmp/r   # smallest sizes, a couple of minutes (smoke run)
    python bench/run_all.py --dry-run             # print the commands only

The benchmarks run in sequence, never together: two torch jobs on the same cores ruin each other's
timings. Each command is the one documented in docs/benchmarks.md next to its table. The TRL side
of the training benchmark needs the `bench` extra (`pip install -e '.[bench]'`); without it the
training benchmark runs opdlab alone and says so. The analysis benchmark's baseline is the study's
own script, which is not part of this repository: set OPDLAB_REFERENCE to the path of your clone's
`scripts/analyze_opd_delta.py` (it needs pandas); without it the benchmark times opdlab alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def commands(results: Path, quick: bool, with_trl: bool) -> dict[str, list[list[str]]]:
    """Benchmark name -> the command lines that produce its results (paths under `results`)."""
    py = [sys.executable]
    # The study's analysis script, if the user has a clone (OPDLAB_REFERENCE=…/scripts/analyze_opd_delta.py).
    reference = ["--reference", os.environ["OPDLAB_REFERENCE"]] if os.environ.get("OPDLAB_REFERENCE") else []
    tools = ["--tools", "opdlab,trl" if with_trl else "opdlab"]
    if quick:
        return {
            "train": [py + [str(BENCH / "bench_train.py"), "--sizes", "tiny", "--trials", "1", "--steps", "1",
                            "--warmup", "0", *tools, "--out", str(results / "train.json")]],
            "profile": [py + [str(BENCH / "profile_train.py"), "--size", "tiny", "--steps", "1",
                              "--out", str(results / "profile_tiny.json")]],
            "optimizer": [py + [str(BENCH / "bench_optimizer.py"), "--size", "tiny", "--trials", "2", "--steps", "2",
                                "--threads", "1", "--out", str(results / "optimizer.json")]],
            "analysis": [py + [str(BENCH / "bench_analysis.py"), "--size", "small",
                               "--out", str(results / "analysis_small.json")]],
            "masked": [py + [str(BENCH / "bench_masked_training.py"), "--size", "tiny", "--densities", "0.2",
                             "--trials", "1", "--steps", "1", "--warmup", "0", "--out", str(results / "masked_training.json")]],
            "step": [py + [str(BENCH / "bench_step.py"), "--prompts", "2", "--samples", "2", "--max-new-tokens", "4",
                           "--rounds", "1", "--out", str(results / "step_pair.json")]],
            "telemetry": [py + [str(BENCH / "bench_telemetry.py"), "--steps", "4", "--every", "2",
                                "--out", str(results / "telemetry.json")]],
            "eval": [py + [str(BENCH / "bench_eval.py"), "--num-eval", "4", "--max-new-tokens", "4", "--rounds", "1",
                           "--threads", "1", "--out", str(results / "eval_pair.json")]],
        }
    return {
        "train": [py + [str(BENCH / "bench_train.py"), *tools, "--out", str(results / "train.json")]],
        "profile": [py + [str(BENCH / "profile_train.py"), "--size", size, "--out", str(results / f"profile_{size}.json")]
                    for size in ("small", "medium")],
        "optimizer": [
            py + [str(BENCH / "bench_optimizer.py"), "--threads", "1", "--trials", "9", "--out", str(results / "optimizer.json")],
            py + [str(BENCH / "bench_optimizer.py"), "--threads", "1", "--trials", "9", "--weight-decay", "0",
                  "--out", str(results / "optimizer_wd0.json")],
        ],
        "analysis": [py + [str(BENCH / "bench_analysis.py"), *reference, "--out", str(results / "analysis.json")]],
        "masked": [py + [str(BENCH / "bench_masked_training.py"), "--out", str(results / "masked_training.json")]],
        "step": [
            py + [str(BENCH / "bench_step.py"), "--run-steps", "30", "--out", str(results / "step_pair.json")],
            py + [str(BENCH / "bench_step.py"), "--student", "smollm2-135m-instruct", "--prompts", "4", "--samples", "1",
                  "--max-new-tokens", "16", "--rounds", "1", "--out", str(results / "step_smollm2-135m-instruct.json")],
        ],
        "telemetry": [py + [str(BENCH / "bench_telemetry.py"), "--out", str(results / "telemetry.json")]],
        "eval": [py + [str(BENCH / "bench_eval.py"), "--student", "smollm2-135m-instruct", "--method", "opsd",
                       "--num-eval", "128", "--rounds", "2", "--out", str(results / "eval_smollm2-135m-instruct.json")]],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated subset of: train, profile, optimizer, analysis, masked, step, telemetry, eval")
    ap.add_argument("--quick", action="store_true", help="smallest sizes (a smoke run, not numbers to report)")
    ap.add_argument("--results", default=str(BENCH / "results"), help="folder for the JSON results")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = ap.parse_args(argv)

    with_trl = importlib.util.find_spec("trl") is not None
    plan = commands(Path(args.results), args.quick, with_trl)
    names = list(plan) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in plan]
    if unknown:
        ap.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(plan)}")
    if not with_trl and "train" in names:
        print("note: trl is not installed (pip install -e '.[bench]'): the training benchmark runs opdlab alone")
    Path(args.results).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    failed = []
    for name in names:
        for cmd in plan[name]:
            shown = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
            print(f"[{name}] {shown}", flush=True)
            if args.dry_run:
                continue
            start = time.perf_counter()
            code = subprocess.call(cmd, cwd=ROOT, env=env)
            print(f"[{name}] exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
            if code != 0:
                failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
