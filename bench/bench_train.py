"""OPD training throughput and memory: opdlab's trainer vs TRL's `DistillationTrainer`, on identical work.

    python bench/bench_train.py                              # sizes small + medium (~8 min on 2 cores)
    python bench/bench_train.py --sizes tiny --trials 1 --steps 1 --warmup 1 --out /tmp/t.json   # smoke run
    python bench/bench_train.py --parity-only --sizes small  # only the like-for-like loss check

Both tools train the same student against the same teacher (Llama architecture, random weights,
built from configs and saved once per size), on the same prompts, with the same batch
(`--prompts-per-step` prompts, one sample each), completion length (`--max-new-tokens`), sampling
(temperature 1, top-p 1, top-k off), loss (full-vocabulary reverse KL: opdlab `loss=reverse_kl`,
TRL `beta=1.0`), optimizer (AdamW, constant lr, no weight decay, gradient clipping at 1.0), fp32
weights on CPU, gradient checkpointing off and the same number of torch threads. `--precisions
fp32,bf16-mixed` measures each size twice: all-fp32, then opdlab's `run.precision=bf16-mixed` beside
TRL's `bf16=True` (both bf16 autocast with fp32 master weights).

Each tool runs in its own long-lived child process (`--worker opdlab|trl`), so imports are paid
once and the peak RSS (`ru_maxrss`, read by the child itself) belongs to one tool alone. The
parent sends "trial" to the two children in turn (alternating who goes first), so load from
other processes on a shared machine hits both alike. A trial builds a fresh trainer from the saved
folders and runs `--warmup` + `--steps` optimizer steps; only the last `--steps` are timed.
Per step: completion tokens, wall time, and its split into generation, teacher scoring and
update (student forward + loss + backward + optimizer step).
  opdlab: its own per-step metrics (`time/rollout_s`, `time/score_s`, `time/update_s`).
  TRL:    a callback times each optimizer step; `_generate_single_turn` and the teacher's
          backbone forward are timed by wrappers/hooks; update = step - generation - teacher.
          (TRL projects the teacher's LM head inside its chunked loss, so that part counts as update.)

Like-for-like check (`parity`, in the parent process): one batch of completions sampled by the student is
fed to opdlab's `accumulate_gradients`, to TRL's `DistillationTrainer.compute_loss`, to
`GKDTrainer.generalized_jsd_loss` (beta=1) and to a direct `F.kl_div` reference; the losses and the
student gradients must agree. Prompts all render to the same length, so there is no left padding:
TRL scores without position ids, which shifts positions of left-padded rows (see docs/benchmarks.md).

The models' vocabulary is the built-in character tokenizer plus filler tokens (never produced
from text, decodable), so the vocabulary axis has a realistic size and a random student rarely
samples EOS: completions run to `--max-new-tokens` for both tools.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench" / "lib"))

from provenance import keep_history, machine  # noqa: E402

PREFIX = "@@bench "  # protocol lines on a child's stdout; anything else there is ignored
QUIET = {"TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
         "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}

SIZES: dict[str, dict[str, Any]] = {
    # vocab; student / teacher: (hidden, layers, intermediate, heads, kv_heads)
    "tiny": {"vocab": 512, "student": (32, 1, 64, 2, 1), "teacher": (48, 2, 96, 2, 1)},
    "small": {"vocab": 2048, "student": (128, 4, 384, 4, 2), "teacher": (256, 6, 768, 4, 2)},
    "medium": {"vocab": 8192, "student": (256, 8, 768, 4, 2), "teacher": (512, 10, 1536, 8, 4)},
}


# ----------------------------------------------------------------------------- the shared setup


def bench_tokenizer(vocab: int) -> Any:
    """opdlab's character tokenizer padded with filler tokens `<fN>` to `vocab` entries."""
    from opdlab.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens([f"<f{i}>" for i in range(vocab - len(tok))])
    assert len(tok) == vocab, (len(tok), vocab)
    return tok


def build_pair(folder: Path, size: str, seed: int = 0, num_prompts: int = 256) -> dict[str, str]:
    """Save student/, teacher/ (fp32 safetensors + tokenizer) and prompts.jsonl; return their paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = SIZES[size]
    tok = bench_tokenizer(spec["vocab"])
    paths: dict[str, str] = {}
    params: dict[str, int] = {}
    for offset, role in enumerate(("student", "teacher")):
        hidden, layers, inter, heads, kv = spec[role]
        cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=hidden, num_hidden_layers=layers,
                          intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                          max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed + offset)
        model = LlamaForCausalLM(cfg)
        model.generation_config.eos_token_id = tok.eos_token_id
        params[role] = sum(p.numel() for p in model.parameters())
        out = folder / role
        model.save_pretrained(out)
        tok.save_pretrained(out)
        paths[role] = str(out)
    rng = random.Random(seed)
    prompts = folder / "prompts.jsonl"
    with prompts.open("w") as f:  # every prompt renders to the same number of tokens (no left padding)
        for _ in range(num_prompts):
            f.write(json.dumps({"prompt": f"add:{rng.randrange(1000):03d}+{rng.randrange(1000):03d}"}) + "\n")
    paths["prompts"] = str(prompts)
    paths["params"] = params  # type: ignore[assignment]
    return paths


def read_prompts(path: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]


def rss_mb() -> float:
    """Current resident set size of this process, MB (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (`ru_maxrss` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(obj: dict) -> None:
    print(PREFIX + json.dumps(obj), flush=True)


# ----------------------------------------------------------------------------- opdlab


def opdlab_config(paths: dict, s: dict, steps: int, run_dir: str) -> Any:
    from opdlab.config import DistillConfig, load_config

    return load_config(DistillConfig, None, {
        "method": "opd", "out": run_dir,
        "model.student": paths["student"], "model.teacher": paths["teacher"],
        "data.prompts": paths["prompts"], "data.num_eval": 1,
        "rollout.prompts_per_step": s["prompts_per_step"], "rollout.samples_per_prompt": 1,
        "rollout.max_new_tokens": s["max_new_tokens"], "rollout.temperature": s["temperature"],
        "rollout.top_p": 1.0, "rollout.micro_batch": s["prompts_per_step"],
        "loss.loss": "reverse_kl",
        "optim.optimizer": "adamw", "optim.lr": s["lr"], "optim.weight_decay": 0.0, "optim.grad_clip": 1.0,
        "optim.schedule": "constant", "optim.warmup_steps": 0,
        "run.steps": steps, "run.seed": s["seed"], "run.eval_every": 0, "run.save_every": 0,
        "run.save_dtype": "fp32", "run.threads": s["threads"], "run.precision": s.get("precision", "fp32"),
    })


def opdlab_trial(paths: dict, s: dict, trial: int) -> list[dict]:
    """Run warmup + steps of opdlab's `train` and return the timed steps from its metrics.jsonl."""
    from opdlab.distill.train import train

    steps = s["warmup"] + s["steps"]
    with tempfile.TemporaryDirectory(prefix="opdlab-bench-") as tmp:
        cfg = opdlab_config(paths, {**s, "seed": s["seed"] + trial}, steps, tmp)
        train(cfg, Path(tmp), progress=False)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) > s["warmup"] and "time/rollout_s" in r]
    return [{"tokens": r["train/completion_tokens"], "generate_s": r["time/rollout_s"], "teacher_s": r["time/score_s"],
             "update_s": r["time/update_s"],
             "step_s": r["time/rollout_s"] + r["time/score_s"] + r["time/update_s"]} for r in rows]


# ----------------------------------------------------------------------------- TRL


def trl_args(s: dict, steps: int, out: str) -> Any:
    from trl import DistillationConfig

    return DistillationConfig(
        output_dir=out, per_device_train_batch_size=s["prompts_per_step"], gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch", bf16=s.get("precision") == "bf16-mixed", fp16=False,
        gradient_checkpointing=False, use_cpu=True, max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"], top_p=1.0, top_k=0, beta=1.0, seed=s["seed"], logging_steps=10_000,
        save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )


def trl_trainer(paths: dict, s: dict, steps: int, out: str, callbacks: list | None = None) -> Any:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationTrainer

    tok = AutoTokenizer.from_pretrained(paths["student"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype="float32")
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype="float32")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in read_prompts(paths["prompts"])])
    return DistillationTrainer(model=student, teacher_model=teacher, args=trl_args(s, steps, out), train_dataset=data,
                               processing_class=tok, callbacks=callbacks)


def trl_trial(paths: dict, s: dict, trial: int) -> list[dict]:
    """Run warmup + steps of TRL's DistillationTrainer; time each optimizer step and its parts."""
    from transformers import TrainerCallback

    steps = s["warmup"] + s["steps"]
    clock = {"generate": 0.0, "teacher": 0.0}
    records: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001 (transformers signature)
            clock.update(generate=0.0, teacher=0.0, start=time.perf_counter())

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            records.append({"step_s": time.perf_counter() - clock["start"], "generate_s": clock["generate"],
                            "teacher_s": clock["teacher"]})

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        trainer = trl_trainer(paths, {**s, "seed": s["seed"] + trial}, steps, tmp, [StepTimer()])
        generate = trainer._generate_single_turn
        tokens: list[int] = []

        def timed_generate(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            completion_ids = generate(*a, **kw)
            clock["generate"] += time.perf_counter() - t0
            tokens.append(sum(len(c) for c in completion_ids))
            return completion_ids

        trainer._generate_single_turn = timed_generate
        backbone = trainer.teacher_model.base_model
        backbone.register_forward_pre_hook(lambda *_: clock.__setitem__("t_teacher", time.perf_counter()))
        backbone.register_forward_hook(
            lambda *_: clock.__setitem__("teacher", clock["teacher"] + time.perf_counter() - clock["t_teacher"]))
        trainer.train()
    out = []
    for rec, n in list(zip(records, tokens))[s["warmup"]:]:
        out.append({**rec, "tokens": n, "update_s": rec["step_s"] - rec["generate_s"] - rec["teacher_s"]})
    return out


# ----------------------------------------------------------------------------- like-for-like check


def parity(paths: dict, s: dict) -> dict:
    """Loss and student gradient of one sampled batch, computed by opdlab, TRL (two trainers) and a reference."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDTrainer

    from opdlab.data.prompts import render_prompts
    from opdlab.distill.rollout import roll_out
    from opdlab.distill.precision import compute_precision
    from opdlab.distill.step import StepModels, accumulate_gradients, loss_function

    torch.manual_seed(s["seed"])
    tok = AutoTokenizer.from_pretrained(paths["student"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype="float32")
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype="float32").eval()
    prompts = read_prompts(paths["prompts"])[: s["prompts_per_step"]]
    batch = roll_out(student, tok, render_prompts(tok, prompts), prompts, max_new_tokens=s["max_new_tokens"],
                     temperature=s["temperature"])
    vocab = student.config.vocab_size
    P = batch.prompt_len
    n_tokens = int(batch.completion_mask_BT.sum())

    def grads(model: Any) -> torch.Tensor:
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return g

    # opdlab: the trainer's own accumulation function
    cfg = opdlab_config(paths, s, 1, "unused")
    student.train()
    models = StepModels(student, teacher, None, vocab, cfg.rollout.micro_batch)
    bf16 = s.get("precision") == "bf16-mixed"  # opdlab and TRL in their bf16 modes; the reference stays fp32
    mixed = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    with compute_precision(s.get("precision", "fp32"), "cpu"):
        loss_opdlab = accumulate_gradients(models, batch, loss_function(cfg.method, cfg.loss)).loss
    g_opdlab = grads(student)

    # reference: F.kl_div on full logits, summed over completion tokens / their count
    ids, attn, comp = batch.input_ids_BT, batch.attention_mask_BT, batch.completion_mask_BT
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attn).logits[:, P - 1:-1]
    s_logits = student(input_ids=ids, attention_mask=attn).logits[:, P - 1:-1]
    per_tok = F.kl_div(t_logits.log_softmax(-1), s_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    loss_ref = (per_tok * comp[:, P:]).sum() / n_tokens
    loss_ref.backward()
    g_ref = grads(student)

    # TRL GKDTrainer's loss function (beta=1 is reverse KL), on full logits with -100 labels
    labels = ids.masked_fill(comp == 0, -100)
    with mixed():
        out = student(input_ids=ids, attention_mask=attn)
        with torch.no_grad():
            t_full = teacher(input_ids=ids, attention_mask=attn).logits
        loss_gkd = GKDTrainer.generalized_jsd_loss(out.logits[:, :-1].float(), t_full[:, :-1].float(),
                                                   labels=labels[:, 1:], beta=1.0, num_items_in_batch=n_tokens)
    loss_gkd.backward()
    g_gkd = grads(student)

    # TRL DistillationTrainer.compute_loss on the same completions (its own chunked loss path)
    with tempfile.TemporaryDirectory(prefix="trl-parity-") as tmp:
        trainer = trl_trainer(paths, s, 1, tmp)
        trainer.model.load_state_dict(student.state_dict())
        trainer.model.train()
        inputs = {"prompt_ids": ids[:, :P], "prompt_mask": attn[:, :P], "completion_ids": ids[:, P:],
                  "completion_mask": comp[:, P:], "num_items_in_batch": torch.tensor(float(n_tokens))}
        with mixed():  # what TRL's Trainer wraps compute_loss in when bf16=True (accelerate's autocast)
            loss_trl = trainer.compute_loss(trainer.model, inputs)
        loss_trl.backward()
        g_trl = grads(trainer.model)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp(min=1e-30))

    values = {"opdlab": float(loss_opdlab), "reference_kl_div": loss_ref.item(),
              "trl_distillation_trainer": loss_trl.item(), "trl_gkd_loss": loss_gkd.item()}
    grad_rel = {"opdlab": rel(g_opdlab, g_ref), "trl_distillation_trainer": rel(g_trl, g_ref),
                "trl_gkd_loss": rel(g_gkd, g_ref)}
    spread = max(values.values()) - min(values.values())
    # fp32: all four are the same sum up to rounding. bf16: each tool's bf16 products against the fp32
    # reference, within the tolerances of tests/unit/test_precision.py (1 % loss, 3 % gradient) doubled.
    loss_tol, grad_tol = (2e-2, 6e-2) if bf16 else (1e-5, 1e-4)
    return {"precision": s.get("precision", "fp32"), "completion_tokens": n_tokens, "rows": ids.shape[0],
            "prompt_len": P, "loss": values, "max_abs_loss_difference": spread,
            "grad_relative_difference_vs_reference": grad_rel, "tolerance": {"loss_relative": loss_tol, "grad_relative": grad_tol},
            "agree": spread <= loss_tol * max(1.0, abs(values["reference_kl_div"])) and max(grad_rel.values()) < grad_tol}


# ----------------------------------------------------------------------------- child process


def worker(kind: str, paths: dict, s: dict) -> None:
    """A child: set up, report ready, then answer 'trial' / 'quit' lines from stdin."""
    import torch

    torch.set_num_threads(s["threads"])
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if kind == "trl":  # each tool's trainer imported before the ready line (TRL imports lazily)
        from trl import DistillationTrainer  # noqa: F401
    else:
        from opdlab.distill.train import train  # noqa: F401
    run = opdlab_trial if kind == "opdlab" else trl_trial
    emit({"ready": True, "rss_at_ready_mb": rss_mb(), "threads": torch.get_num_threads()})
    trial = 0
    for line in sys.stdin:
        if line.strip() == "trial":
            emit({"steps": run(paths, s, trial), "peak_rss_mb": peak_rss_mb()})
            trial += 1
        elif line.strip() == "quit":
            break
    emit({"done": True, "peak_rss_mb": peak_rss_mb()})


class Child:
    """One worker process and its line protocol."""

    def __init__(self, kind: str, paths: dict, s: dict) -> None:
        env = {**os.environ, **QUIET,
               "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--paths", json.dumps(paths),
               "--settings", json.dumps(s)]
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        raise RuntimeError(f"{self.kind} worker exited with code {self.proc.wait()} before answering (see stderr)")

    def ask(self, command: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        final = self.ask("quit")
        self.proc.wait(timeout=60)
        return final


# ----------------------------------------------------------------------------- the parent


def summarize_report(report: dict) -> dict:
    """A replaced run, for the history list: per size and precision, throughput and the opdlab/TRL ratio."""
    sizes = {}
    for r in report.get("results", []):
        row: dict[str, Any] = {}
        for tool in ("opdlab", "trl"):
            if tool in r:
                row[f"{tool}_tokens_per_s_median"] = round(r[tool]["tokens_per_s_median"], 1)
                row[f"{tool}_per_step_s_median"] = {k: round(v, 3) for k, v in r[tool]["per_step_s_median"].items()}
                row[f"{tool}_peak_rss_mb"] = round(r[tool]["peak_rss_mb"], 1)
        ratio = r.get("opdlab_vs_trl") or {}
        for key in ("throughput_ratio_median", "throughput_ratio_min", "throughput_ratio_max"):
            if key in ratio:
                row[key] = round(ratio[key], 3)
        sizes[f'{r["size"]} {r.get("precision", "fp32")}'] = row
    return {"sizes": sizes}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "accelerate", "datasets", "opdlab"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def summarize(trials: list[list[dict]]) -> dict:
    """Per-trial throughput (completion tokens / s over the timed steps) and time split, with median/min/max."""
    tps, split = [], {"generate_s": [], "teacher_s": [], "update_s": [], "step_s": []}
    for steps in trials:
        total = sum(r["step_s"] for r in steps)
        tps.append(sum(r["tokens"] for r in steps) / total)
        for k in split:
            split[k].append(sum(r[k] for r in steps) / len(steps))
    med = {k: statistics.median(v) for k, v in split.items()}
    return {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
            "tokens_per_s_trials": tps, "per_step_s_median": med,
            "split_fraction": {k: med[k] / med["step_s"] for k in ("generate_s", "teacher_s", "update_s")},
            "tokens_per_step": statistics.median(r["tokens"] for steps in trials for r in steps)}


def bench_size(size: str, s: dict, tools: list[str], workdir: Path, parity_only: bool) -> dict:
    t0 = time.perf_counter()
    paths = build_pair(workdir / f"{size}-{s['precision']}", size, seed=s["seed"])
    params = paths.pop("params")
    result: dict[str, Any] = {"size": size, "precision": s["precision"], "model": SIZES[size], "parameters": params}
    def check_parity() -> None:
        # In this (unmeasured) parent process, and only after the measured children have started:
        # a child started by fork+exec inherits the parent's peak-RSS mark (ru_maxrss), so running
        # the parity check first would inflate both tools' peak memory alike.
        import torch

        torch.set_num_threads(s["threads"])
        result["parity"] = parity(paths, s)
        print(f"[{size} {s['precision']}] parity: {json.dumps(result['parity']['loss'])} agree={result['parity']['agree']}", flush=True)

    if parity_only:
        check_parity()
        return result
    children = {kind: Child(kind, paths, s) for kind in tools}
    ready = {kind: c.read() for kind, c in children.items()}
    trials: dict[str, list[list[dict]]] = {kind: [] for kind in tools}
    for t in range(s["trials"]):
        order = tools if t % 2 == 0 else tools[::-1]
        for kind in order:
            answer = children[kind].ask("trial")
            trials[kind].append(answer["steps"])
            tps = sum(r["tokens"] for r in answer["steps"]) / sum(r["step_s"] for r in answer["steps"])
            print(f"[{size} {s['precision']}] trial {t + 1}/{s['trials']} {kind}: {tps:,.0f} completion tokens/s", flush=True)
    if "trl" in tools:
        check_parity()
    for kind, child in children.items():
        final = child.close()
        result[kind] = {**summarize(trials[kind]), "peak_rss_mb": final["peak_rss_mb"],
                        "rss_at_ready_mb": ready[kind]["rss_at_ready_mb"], "trials": trials[kind]}
    if "trl" in tools:
        paired = [a / b for a, b in zip(result["opdlab"]["tokens_per_s_trials"], result["trl"]["tokens_per_s_trials"])]
        result["opdlab_vs_trl"] = {
            "throughput_ratio_median": statistics.median(paired), "throughput_ratio_min": min(paired),
            "throughput_ratio_max": max(paired), "throughput_ratio_trials": paired,
            "peak_rss_ratio": result["opdlab"]["peak_rss_mb"] / result["trl"]["peak_rss_mb"],
            "peak_rss_above_import_ratio": (result["opdlab"]["peak_rss_mb"] - result["opdlab"]["rss_at_ready_mb"])
            / (result["trl"]["peak_rss_mb"] - result["trl"]["rss_at_ready_mb"]),
        }
    result["wall_s"] = time.perf_counter() - t0
    return result


def table(report: dict) -> str:
    """Markdown rows: one per size and tool."""
    lines = ["| size (student / teacher params) | precision | tool | completion tok/s median [min–max] | "
             "gen / teacher / update | peak RSS MB (at start) | opdlab ÷ TRL tok/s [min–max] |",
             "|---|---|---|---:|---|---:|---:|"]
    for r in report["results"]:
        for kind in ("opdlab", "trl"):
            if kind not in r:
                continue
            x, f = r[kind], r[kind]["split_fraction"]
            ratio = ""
            if kind == "opdlab" and "opdlab_vs_trl" in r:
                v = r["opdlab_vs_trl"]
                ratio = (f"{v['throughput_ratio_median']:.2f}× [{v['throughput_ratio_min']:.2f}–"
                         f"{v['throughput_ratio_max']:.2f}]")
            p = r["parameters"]
            lines.append(f"| {r['size']} ({p['student'] / 1e6:.1f} M / {p['teacher'] / 1e6:.1f} M) | "
                         f"{r.get('precision', 'fp32')} | {kind} | "
                         f"{x['tokens_per_s_median']:,.0f} [{x['tokens_per_s_min']:,.0f}–{x['tokens_per_s_max']:,.0f}] | "
                         f"{f['generate_s']:.0%} / {f['teacher_s']:.0%} / {f['update_s']:.0%} | "
                         f"{x['peak_rss_mb']:,.0f} ({x['rss_at_ready_mb']:,.0f}) | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,medium", help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--tools", default="opdlab,trl", help="opdlab,trl or opdlab (TRL not installed)")
    ap.add_argument("--precisions", default="fp32",
                    help="comma-separated: fp32 and/or bf16-mixed (opdlab run.precision=bf16-mixed beside TRL bf16=True)")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per trial")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps at the start of each trial")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in each child (1: on a shared 2-core machine, 2 OpenMP threads per op thrash)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parity-only", action="store_true")
    ap.add_argument("--workdir", default=None, help="where the generated models go (default: a temp folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    ap.add_argument("--worker", choices=("opdlab", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, json.loads(args.paths), json.loads(args.settings))
        return {}

    from opdlab.fileio import write_json

    os.environ.update(QUIET)
    tools = [t for t in args.tools.split(",") if t]
    settings = {"prompts_per_step": args.prompts_per_step, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "lr": args.lr, "threads": args.threads, "seed": args.seed,
                "trials": args.trials, "steps": args.steps, "warmup": args.warmup}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        results = [bench_size(size, {**settings, "precision": precision}, tools, workdir, args.parity_only)
                   for size in args.sizes.split(",") for precision in args.precisions.split(",")]
    report = {
        "schema": 1, "benchmark": "train",
        "command": "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(load_start),
        "versions": versions(),
        "settings": {**settings, "tools": tools, "samples_per_prompt": 1, "top_p": 1.0, "top_k": "off",
                     "loss": "full-vocabulary reverse KL (opdlab loss=reverse_kl; TRL DistillationTrainer beta=1.0)",
                     "optimizer": "AdamW (torch), constant lr, weight_decay 0, eps 1e-8, grad clip 1.0",
                     "dtype": "float32 weights; products per precision (bf16-mixed: bf16 autocast, TRL bf16=True)",
                     "precisions": args.precisions.split(","), "device": "cpu", "gradient_checkpointing": False,
                     "architecture": "LlamaForCausalLM, untied embeddings, random init",
                     "tokenizer": "opdlab built-in character tokenizer + filler tokens to the model vocabulary"},
        "results": results,
    }
    report = keep_history(args.out, report, summarize_report)
    write_json(args.out, report)
    if not args.parity_only:
        print(table(report))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
