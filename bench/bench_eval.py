"""The held-out evaluation: the student's side of the reverse KL from the greedy decoder vs a forward pass.

    python bench/bench_eval.py                                             # the built-in pair
    python bench/bench_eval.py --student smollm2-135m-instruct --method opsd --num-eval 128 --rounds 2

`distill/evaluate.evaluate` decodes each held-out prompt greedily, then needs the student's and the
teacher's distributions at every completion token. The decoder has just computed the student's
(`roll_out(logits_out=...)`), so by default the evaluation reads them from it (`reused`) instead of
running the student over the finished completions again (`forward`, `reuse_decode_logits=False`).
Both variants run in one process on the same prompts, interleaved round by round, with the threads
the demos use; the result reports each variant's wall seconds, their ratio, and the largest
difference between the two variants' per-prompt reverse-KL sums (float32 rounding only). With
`--method opsd` the teacher is the student's frozen copy reading the privileged prompt, as in
`opdlab demo --real`. Writes bench/results/eval_<model>.json (bench/lib/provenance.py records the
machine).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench" / "lib"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_step import interleaved  # noqa: E402
from provenance import keep_history, report_header  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default=None, help="default: the built-in pair's student")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--method", choices=["opd", "opsd"], default="opd",
                    help="opsd: the teacher is the student's copy behind the privileged prompt")
    ap.add_argument("--task", default=None, help="default: the pair's task (chat-subtraction for a user student)")
    ap.add_argument("--num-eval", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="default bench/results/eval_<model>.json")
    args = ap.parse_args(argv)

    import torch

    from opdlab.config import DataConfig, ModelConfig
    from opdlab.data.prompts import render_prompts
    from opdlab.distill.evaluate import evaluate
    from opdlab.distill.privileged import teacher_prompt_ids
    from opdlab.distill.sources import task_examples
    from opdlab.fileio import write_json
    from opdlab.models.loading import load_models

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    teacher_name = args.teacher or args.student
    models = load_models(ModelConfig(student=args.student, teacher=teacher_name))
    student, teacher, tok = models.student, models.teacher, models.tokenizer
    task = args.task or models.task or "chat-subtraction"
    examples = task_examples(task, args.num_eval, seed=1, split="eval")
    prompts = render_prompts(tok, [ex.prompt for ex in examples])
    privileged = (teacher_prompt_ids(models.teacher_tokenizer, examples, DataConfig().privileged_template)
                  if args.method == "opsd" else None)
    vocab = int(student.config.get_text_config().vocab_size)
    rows: dict[str, dict] = {}

    def variant(name: str, reuse: bool):
        def run() -> None:
            rows[name] = evaluate(student, teacher, tok, examples, prompts, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, vocab_size=vocab, chunk=4096,
                                  teacher_prompt_ids=privileged, reuse_decode_logits=reuse)
        return run

    timings = interleaved({"reused": variant("reused", True), "forward": variant("forward", False)}, args.rounds)
    a, b = rows["reused"]["eval/examples"], rows["forward"]["eval/examples"]
    max_diff = max(abs(x - y) for x, y in zip(a["reverse_kl_sum"], b["reverse_kl_sum"]))
    ratio = timings["forward"]["wall_s_median"] / timings["reused"]["wall_s_median"]
    results = {"timings": timings, "speedup_wall": round(ratio, 3),
               "reverse_kl": {k: rows[k]["eval/reverse_kl"] for k in rows},
               "answer_logp": {k: rows[k].get("eval/answer_logp") for k in rows},
               "max_abs_diff_reverse_kl_sum": max_diff,
               "accuracy_equal": rows["reused"].get("eval/accuracy") == rows["forward"].get("eval/accuracy")}
    print(f"evaluation of {args.num_eval} prompts: forward {timings['forward']['wall_s_median']:.2f} s, "
          f"reused {timings['reused']['wall_s_median']:.2f} s ({ratio:.2f}x); max |diff| of per-prompt KL sums "
          f"{max_diff:.2e}", flush=True)
    name = (args.student or "pair").replace("/", "_")
    report = {
        **report_header("eval", "bench_eval.py", argv, load_start),
        "settings": {"student": str(models.student_path), "teacher": str(models.teacher_path), "task": task,
                     "method": args.method, "num_eval": args.num_eval, "batch_size": args.batch_size,
                     "max_new_tokens": args.max_new_tokens, "threads": args.threads, "rounds": args.rounds},
        "results": results,
    }
    out = args.out or str(ROOT / "bench" / "results" / f"eval_{name}.json")
    report = keep_history(out, report)
    write_json(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
