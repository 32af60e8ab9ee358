"""The cost of update telemetry (run.track_update_every) against the training it watches.

    python bench/bench_telemetry.py                           # a short run on the built-in pair, tracked every 6 steps
    python bench/bench_telemetry.py --from opdlab-demo-real   # the runs of a finished demo or study, as they ran
    python bench/bench_telemetry.py --steps 60 --every 6 --student smollm2-135m-instruct --task chat-subtraction

Every tracked step logs `time/update_tracking_s` beside the step's own `time/rollout_s`,
`time/score_s` and `time/update_s` (metrics.jsonl), measured in the same process on the same
cores. Per run, the cost is Σ tracking / Σ (rollout + score + update) over its steps: the share of
training time the telemetry adds at that run's interval (mask snapshots included where the run
saved them; evaluations and checkpoints, which the telemetry does not touch, are left out of the
denominator, so the share is an upper bound). Target: ≤ 5 %. Writes bench/results/telemetry.json
(bench/lib/provenance.py records the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench" / "lib"))

from provenance import keep_history, machine  # noqa: E402

TARGET = 0.05  # telemetry time / training step time


def run_cost(metrics_file: Path) -> dict[str, Any] | None:
    """Telemetry share of one run's step time, from its metrics.jsonl (None when it was not tracked)."""
    steps = tracked = 0
    step_s = tracking_s = 0.0
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "time/rollout_s" not in row:
            continue
        steps += 1
        step_s += sum(float(row.get(k) or 0.0) for k in ("time/rollout_s", "time/score_s", "time/update_s"))
        if "time/update_tracking_s" in row:
            tracked += 1
            tracking_s += float(row["time/update_tracking_s"])
    if not tracked or step_s <= 0:
        return None
    return {"steps": steps, "tracked_steps": tracked, "step_s": step_s, "tracking_s": tracking_s,
            "tracking_s_per_measurement": round(tracking_s / tracked, 4), "cost_fraction": tracking_s / step_s,
            "masks_saved": (metrics_file.parent / "masks").is_dir()}


def costs_under(folder: Path) -> dict[str, dict[str, Any]]:
    """run folder (relative to `folder`) -> its cost, for every tracked run found below `folder`."""
    out = {}
    for metrics in sorted(folder.rglob("metrics.jsonl")):
        cost = run_cost(metrics)
        if cost is not None:
            out[str(metrics.parent.relative_to(folder))] = cost
    return out


def train_once(work: Path, args: argparse.Namespace) -> Path:
    from opdlab.cli import main as opdlab

    run_dir = work / "run"
    argv = ["distill", "--out", str(run_dir), "--steps", str(args.steps), "--set", f"run.threads={args.threads}",
            "--set", f"run.track_update_every={args.every}", "--set", "run.save_update_masks=true",
            "--set", "run.eval_every=0", "--set", "run.save_every=0"]
    if args.student:
        argv += ["--student", args.student, "--method", "opsd", "--task", args.task,
                 "--set", "rollout.samples_per_prompt=1", "--set", "rollout.max_new_tokens=16",
                 "--set", "rollout.prompts_per_step=4", "--set", "data.num_eval=8"]
    if opdlab(argv) != 0:
        raise SystemExit("the training run failed")
    return run_dir


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", default=None, metavar="DIR",
                    help="read the runs of a finished demo, study or run folder instead of training")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=6, help="run.track_update_every of the run trained here")
    ap.add_argument("--student", default=None, help="default: the built-in pair (with --student: method opsd)")
    ap.add_argument("--task", default="chat-subtraction")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "telemetry.json"))
    args = ap.parse_args(argv)

    load = os.getloadavg()
    started = time.time()
    if args.source:
        runs = costs_under(Path(args.source))
        settings: dict[str, Any] = {"from": Path(args.source).name}
    else:
        with tempfile.TemporaryDirectory(prefix="opdlab-telemetry-") as tmp:
            runs = costs_under(train_once(Path(tmp), args).parent)
        settings = {"steps": args.steps, "every": args.every, "student": args.student or "built-in pair",
                    "threads": args.threads}
    if not runs:
        raise SystemExit("no tracked runs found (metrics.jsonl rows with time/update_tracking_s)")
    fractions = sorted(r["cost_fraction"] for r in runs.values())
    summary = {"runs": len(runs), "cost_fraction_median": fractions[len(fractions) // 2],
               "cost_fraction_max": fractions[-1], "target": TARGET, "meets_target": fractions[-1] <= TARGET}
    command = "python bench/bench_telemetry.py" + (" " + " ".join(argv) if argv else " " + " ".join(sys.argv[1:]))
    report = {"schema": 1, "benchmark": "telemetry", "command": command.strip(), "machine": machine(load),
              "settings": settings, "summary": summary, "runs": runs, "seconds": round(time.time() - started, 1)}
    report = keep_history(args.out, report, lambda previous: previous.get("summary"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(summary))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
