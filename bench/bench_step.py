"""One OPD step's parts on a fixed batch: fp32 vs bf16-mixed, and opdlab's fast paths vs the transformers paths.

    python bench/bench_step.py                                   # the built-in pair, the demo's batch
    python bench/bench_step.py --student smollm2-135m-instruct --prompts 8 --samples 1 --max-new-tokens 32
    python bench/bench_step.py --run-steps 30                    # + accuracy after a short run in each precision

On one batch (the student's seeded rollout of `--prompts` prompts x `--samples` samples), in one
process, with the variants interleaved round by round (so load from other processes hits them
alike), CPU seconds (`time.process_time`, one torch thread) and wall seconds of:
  roll out        `roll_out` fast (distill/decode.py) vs `fast=False` (`model.generate`)
  teacher score   `score` with shared prompts vs `share_prompts=False`
  student update  the student's forward + loss + backward, shared prompts vs one pass
each under run.precision fp32 and bf16-mixed. Also the loss and gradient of the step in bf16-mixed
against fp32 on the same batch, and (with `--run-steps N`) held-out accuracy after N OPD steps in
each precision. Writes `bench/results/step_<model>.json` (bench/lib/provenance.py records the machine).
Without `--teacher`, the teacher is the pair's teacher, or for a user student its own frozen copy
(self-distillation: the loss is then ~0 and only the timings mean something).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench" / "lib"))

from provenance import keep_history, report_header  # noqa: E402


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, float]]:
    """CPU and wall seconds of each variant: one call each per round, the order alternating."""
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    names = list(variants)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            c, w = time.process_time(), time.perf_counter()
            variants[name]()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {k: {"cpu_s_median": statistics.median(cpu[k]), "cpu_s_min": min(cpu[k]),
                "wall_s_median": statistics.median(wall[k])} for k in variants}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default=None, help="default: the built-in pair's student")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--precisions", default="fp32,bf16-mixed")
    ap.add_argument("--run-steps", type=int, default=0, help="also train this many OPD steps per precision (pair only)")
    ap.add_argument("--out", default=None, help="default bench/results/step_<model>.json")
    args = ap.parse_args(argv)

    import torch

    from opdlab.config import DistillConfig, LossConfig, ModelConfig, load_config
    from opdlab.data.prompts import render_prompts
    from opdlab.distill.losses import opd_loss
    from opdlab.distill.precision import compute_precision
    from opdlab.distill.rollout import completion_logits, roll_out, score
    from opdlab.distill.sampling import row_seeds
    from opdlab.distill.sources import task_examples
    from opdlab.fileio import write_json
    from opdlab.models.loading import load_models

    torch.set_num_threads(1)
    load_start = os.getloadavg()
    models = load_models(ModelConfig(student=args.student, teacher=args.teacher or (args.student and args.student)))
    student, teacher, tok = models.student, models.teacher, models.tokenizer
    task = models.task or "addition"
    examples = task_examples(task, args.prompts, seed=1, split="train")
    prompt_ids = render_prompts(tok, [ex.prompt for ex in examples])
    seeds = row_seeds(0, 1, 0, args.prompts, args.samples)
    vocab = int(student.config.get_text_config().vocab_size)
    kw = dict(samples=args.samples, max_new_tokens=args.max_new_tokens, seeds=seeds)
    batch = roll_out(student, tok, prompt_ids, examples, **kw)
    loss_cfg = LossConfig()
    student.train()

    def update(share: bool, precision: str) -> tuple[float, torch.Tensor]:
        with compute_precision(precision, "cpu"):
            t_logits = score(teacher, batch, vocab)
            logits = completion_logits(student, batch, vocab, share_prompts=share)
            loss, _ = opd_loss(loss_cfg.loss, logits, t_logits, batch.targets_BC, batch.mask_BC, batch.num_tokens,
                               beta=loss_cfg.beta, top_k=loss_cfg.top_k, chunk=loss_cfg.vocab_chunk)
            loss.backward()
        grad = torch.cat([p.grad.flatten() for p in student.parameters()])
        student.zero_grad(set_to_none=True)
        return float(loss.detach()), grad

    def in_precision(precision: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with compute_precision(precision, "cpu"):
                return fn()
        return run

    timings: dict[str, dict[str, dict[str, float]]] = {}
    for precision in args.precisions.split(","):
        print(f"[{precision}] timing ...", flush=True)
        with torch.no_grad():
            timings[f"roll out, {precision}"] = interleaved({
                "fast (distill/decode.py)": in_precision(precision, lambda: roll_out(student, tok, prompt_ids, examples, **kw)),
                "generate": in_precision(precision, lambda: roll_out(student, tok, prompt_ids, examples, fast=False, **kw)),
            }, args.rounds)
        timings[f"teacher score, {precision}"] = interleaved({
            "shared prompts": in_precision(precision, lambda: score(teacher, batch, vocab)),
            "one pass": in_precision(precision, lambda: _score_one_pass(teacher, batch, vocab)),
        }, args.rounds)
        timings[f"student forward+loss+backward (with scoring), {precision}"] = interleaved({
            "shared prompts": lambda: update(True, precision), "one pass": lambda: update(False, precision)}, args.rounds)
        for part, t in timings.items():
            if part.endswith(precision):
                print(f"  {part}: " + ", ".join(f"{k} {v['cpu_s_median'] * 1e3:.0f} ms" for k, v in t.items()), flush=True)

    numbers: dict[str, Any] = {}
    if "bf16-mixed" in args.precisions:
        loss32, g32 = update(False, "fp32")
        loss16, g16 = update(False, "bf16-mixed")
        numbers = {"loss_fp32": loss32, "loss_bf16_mixed": loss16,
                   "loss_relative_difference": abs(loss16 - loss32) / max(abs(loss32), 1e-30),
                   "grad_relative_difference": float((g16 - g32).norm() / g32.norm().clamp(min=1e-30)),
                   "grad_cosine": float(torch.nn.functional.cosine_similarity(g16.double(), g32.double(), dim=0))}
        print(f"bf16-mixed vs fp32 on the batch: {json.dumps(numbers)}", flush=True)

    accuracy: dict[str, Any] = {}
    if args.run_steps and args.student is None:
        from opdlab.distill.train import train

        for precision in args.precisions.split(","):
            with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
                cfg = load_config(DistillConfig, None, {"run.steps": args.run_steps, "run.precision": precision,
                                                        "run.threads": 1, "run.eval_every": 0, "run.save_every": 0,
                                                        "optim.lr": 3e-4, "out": tmp})
                w = time.perf_counter()
                train(cfg, Path(tmp), progress=False)
                rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
                accuracy[precision] = {"start": rows[0].get("eval/accuracy"), "end": rows[-1].get("eval/accuracy"),
                                       "reverse_kl_end": rows[-1].get("eval/reverse_kl"),
                                       "wall_s": time.perf_counter() - w}
                print(f"[{precision}] {args.run_steps} steps: {json.dumps(accuracy[precision])}", flush=True)

    name = (args.student or "pair").replace("/", "_")
    report = {
        **report_header("step", "bench_step.py", argv, load_start),
        "settings": {"student": str(models.student_path), "teacher": str(models.teacher_path), "task": task,
                     "prompts": args.prompts, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                     "rounds": args.rounds, "threads": 1, "rows": batch.num_rows,
                     "batch_shape": list(batch.input_ids_BT.shape), "completion_tokens": batch.num_tokens},
        "timings": timings, "bf16_vs_fp32": numbers, "short_run_accuracy": accuracy,
    }
    out = args.out or str(ROOT / "bench" / "results" / f"step_{name}.json")
    report = keep_history(out, report, lambda previous: {"timings": previous.get("timings")})
    write_json(out, report)
    print(f"wrote {out}")
    return report


def _score_one_pass(teacher: Any, batch: Any, vocab: int) -> Any:
    import torch

    from opdlab.distill.rollout import completion_logits

    with torch.inference_mode():
        return completion_logits(teacher, batch, vocab, share_prompts=False).clone()


if __name__ == "__main__":
    main()
