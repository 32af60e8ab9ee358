"""The built-in tiny teacher/student pairs: built deterministically from a seed, shipped, cached.

    paths = build_pair("sort-tiny")           # copies the shipped pair into the cache (fast)
    model = AutoModelForCausalLM.from_pretrained(paths.student)
    tok = AutoTokenizer.from_pretrained(paths.student)
    build_pair("sort-tiny", rebuild=True)     # retrain from the seed (a few minutes on 2 cores)

How a pair is made (`train_pair`), and where it deviates from the study:
1. One ~1 M-parameter Llama is trained from scratch by SFT (loss on completion tokens of
   chat-formatted examples) on a mixture of every task family, so its weights have real
   structure (random weights have no meaningful principal subspaces).
2. The *student source* is the first evaluation at which greedy held-out accuracy on the
   pair's distillation task reaches `student_min_accuracy`: stopped by accuracy, not by
   time, because when a tiny transformer leaves its loss plateau varies by seed.
3. The *teacher* is the same run trained further until `teacher_min_accuracy`: a stronger
   copy of the student, like the study's RL-improved (JustRL) teacher. A teacher from a
   separate run would differ from the student in more than skill (docs/zoo.md, "How the
   pairs were made").
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from opdlab.data.tasks import Example, accuracy, get_task
from opdlab.errors import UserError
from opdlab.fileio import atomic_path, write_json
from opdlab.models.tokenizer import build_tokenizer

METADATA_FILE = "opdlab_pair.json"


@dataclass(frozen=True)
class PairSpec:
    """A built-in pair: its architecture, training recipe and the accuracies that stop training.

    `task` is the distillation task (whose accuracy picks the student and teacher);
    `train_mix` is the mixture both are trained on: (task, share) pairs over every family,
    weighted toward the distillation task so that its plateau ends within minutes.
    """

    name: str
    description: str
    task: str
    train_mix: tuple[tuple[str, float], ...] = (("addition", 0.55), ("addition3", 0.15), ("sort", 0.15), ("reverse", 0.15))
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    train_pool: int = 60_000
    num_eval: int = 200
    eval_every: int = 25
    fine_eval_every: int = 5
    student_min_accuracy: float = 0.10
    teacher_min_accuracy: float = 0.90
    max_steps: int = 6000
    threads: int = 1


PAIRS: dict[str, PairSpec] = {
    # The default pair. Its student and teacher come from one training run (the study's
    # "RL-improved copy of the student" setting): the student is the checkpoint of the run
    # that first reached 25 % on letter sorting, the teacher the one that reached 85 %.
    # Every field is spelled out so that changing a default above cannot silently change it.
    "sort-tiny": PairSpec(
        name="sort-tiny",
        description="1 M-param Llama pair on sorting letters (trained on a 4-task mix); student ~34 %, teacher ~89 %",
        task="sort",
        train_mix=(("addition", 0.55), ("addition3", 0.15), ("sort", 0.15), ("reverse", 0.15)),
        seed=0, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, batch_size=64, lr=2e-3,
        warmup_steps=50, weight_decay=0.01, train_pool=60_000, num_eval=200, eval_every=25, fine_eval_every=5,
        student_min_accuracy=0.25, teacher_min_accuracy=0.85, max_steps=3000, threads=1,
    ),
    # The same recipe with 2-digit reversed addition as the distillation task: the student is
    # the run's first checkpoint at >= 10 % (shipped: 15 % at step 805), the teacher the first
    # at >= 90 % (step 1100).
    "arith-tiny": PairSpec(
        name="arith-tiny",
        description="1 M-param Llama pair on 2-digit reversed addition (4-task mix); student ~13 %, teacher ~90 %",
        task="addition",
        train_mix=(("addition", 0.55), ("addition3", 0.15), ("sort", 0.15), ("reverse", 0.15)),
        seed=0, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, batch_size=64, lr=2e-3,
        warmup_steps=50, weight_decay=0.01, train_pool=60_000, num_eval=200, eval_every=25, fine_eval_every=5,
        student_min_accuracy=0.10, teacher_min_accuracy=0.90, max_steps=4000, threads=1,
    ),
}


@dataclass(frozen=True)
class PairPaths:
    """Hugging Face folders (config.json, model.safetensors in fp32, tokenizer files) of a built pair."""

    name: str
    student: Path
    teacher: Path
    task: str


def cache_dir() -> Path:
    """Where built pairs live: $OPDLAB_CACHE, else ~/.cache/opdlab."""
    env = os.environ.get("OPDLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "opdlab"


def list_pairs() -> list[PairSpec]:
    return list(PAIRS.values())


def get_spec(name: str) -> PairSpec:
    try:
        return PAIRS[name]
    except KeyError:
        raise UserError(f"unknown pair {name!r}; known pairs: {', '.join(PAIRS)} (see `opdlab zoo list`)") from None


def pair_dir(name: str) -> Path:
    return cache_dir() / "zoo" / name


def shipped_dir(name: str) -> Path | None:
    """The pair's folder inside the installed package, if its weights ship with it."""
    root = Path(str(resources.files("opdlab"))) / "zoo_data" / name
    return root if _is_complete(root) else None


def _is_complete(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file() and all(
        (folder / role / f).is_file() for role in ("student", "teacher") for f in ("config.json", "model.safetensors")
    )


def _paths(spec: PairSpec, folder: Path) -> PairPaths:
    return PairPaths(name=spec.name, student=folder / "student", teacher=folder / "teacher", task=spec.task)


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The `opdlab_pair.json` of a pair folder (how it was built, measured accuracies)."""
    return json.loads((Path(folder) / METADATA_FILE).read_text(encoding="utf-8"))


def is_cached(name: str) -> bool:
    """Whether `build_pair(name)` would return at once (a complete cached pair of the current spec)."""
    target = pair_dir(name)
    return _is_complete(target) and read_metadata(target).get("spec") == _spec_dict(get_spec(name))


def approx_params(spec: PairSpec) -> int:
    """Parameters per model of a pair (untied embeddings, no biases), without building it."""
    h, v = spec.hidden_size, len(build_tokenizer())
    per_layer = 4 * h * h + 3 * h * spec.intermediate_size + 2 * h
    return spec.num_layers * per_layer + 2 * v * h + h


def build_pair(name: str = "sort-tiny", rebuild: bool = False, progress: bool = True) -> PairPaths:
    """Return the cached pair `name`, filling the cache first if needed.

    The cache is filled from the weights shipped in the package (a copy), or, with
    `rebuild=True` or when nothing is shipped, by training from the spec's seed.
    A cached pair built from a different spec is replaced.
    """
    spec = get_spec(name)
    target = pair_dir(name)
    if not rebuild and is_cached(name):
        return _paths(spec, target)
    shipped = shipped_dir(name)
    with atomic_path(target) as tmp:
        if shipped is not None and not rebuild:
            shutil.copytree(shipped, tmp)
        else:
            train_pair(spec, tmp, progress=progress)
    return _paths(spec, target)


def _spec_dict(spec: PairSpec) -> dict[str, Any]:
    """The spec as it reads back from JSON (tuples become lists), for comparing with metadata."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def _training_examples(spec: PairSpec) -> list[Example]:
    """`spec.train_pool` train-split examples, each family's share as in `spec.train_mix`."""
    out: list[Example] = []
    for name, share in spec.train_mix:
        out += get_task(name).examples(round(share * spec.train_pool), spec.seed, "train")
    return out  # batches are drawn uniformly from the pool, so order does not matter


# ----------------------------------------------------------------------------- models


def model_config(spec: PairSpec, vocab_size: int, arch: Literal["llama", "qwen2"] = "llama") -> Any:
    """The transformers config of a pair's models (both roles share it)."""
    from transformers import LlamaConfig, Qwen2Config

    tok = build_tokenizer()
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)


def save_random_model(
    folder: str | Path,
    arch: Literal["llama", "qwen2"] = "llama",
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int | None = None,
) -> Path:
    """Save a tiny randomly initialised causal LM plus the built-in tokenizer to `folder`.

    For tests: a real HF folder in well under a second. `vocab_size` larger than the
    tokenizer's gives a padded vocabulary (as real teachers often have).
    """
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    spec = dataclasses.replace(
        PAIRS["arith-tiny"], hidden_size=hidden_size, num_layers=num_layers, num_heads=4, intermediate_size=2 * hidden_size
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(spec, vocab_size or len(tok), arch))
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- training


def _encode(tok: Any, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted (prompt, answer) sequences, right-padded.

    Returns input_ids_NL and labels_NL (-100 except on answer tokens and the final EOS).
    """
    prompts = [tok.apply_chat_template([{"role": "user", "content": e.prompt}], tokenize=False, add_generation_prompt=True) for e in examples]
    fulls = [
        tok.apply_chat_template([{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}], tokenize=False)
        for e in examples
    ]
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tok(fulls, add_special_tokens=False)["input_ids"]
    length = max(len(f) for f in full_ids)
    ids = torch.full((len(examples), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
        assert f[: len(p)] == p, "chat template: the conversation must extend the generation prompt"
        ids[i, : len(f)] = torch.tensor(f)
        labels[i, len(p) : len(f)] = torch.tensor(f[len(p) :])
    return ids, labels


@torch.no_grad()
def greedy_accuracy(model: Any, tok: Any, examples: list[Example], max_new_tokens: int = 8, batch_size: int = 256) -> float:
    """Exact-match accuracy of greedy completions (chat-formatted prompts, left padding)."""
    return accuracy(greedy_completions(model, tok, examples, max_new_tokens, batch_size), examples)


@torch.no_grad()
def greedy_completions(model: Any, tok: Any, examples: list[Example], max_new_tokens: int = 8, batch_size: int = 256) -> list[str]:
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": e.prompt}], tokenize=False, add_generation_prompt=True) for e in chunk]
        batch = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        gen = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        out += tok.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return out


def train_pair(spec: PairSpec, folder: Path, progress: bool = True) -> dict[str, Any]:
    """Train a pair per `spec` into `folder` (student/, teacher/, opdlab_pair.json); return the metadata."""
    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    start, cpu_start = time.perf_counter(), time.process_time()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        tok = build_tokenizer()
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(model_config(spec, len(tok)))
        ids_NL, labels_NL = _encode(tok, _training_examples(spec))
        evals = get_task(spec.task).examples(spec.num_eval, spec.seed, "eval")
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=spec.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / spec.warmup_steps))
        order = torch.Generator().manual_seed(spec.seed)
        model.train()

        student: dict[str, torch.Tensor] | None = None
        history: list[tuple[int, float]] = []
        student_step, student_acc, teacher_acc = -1, 0.0, 0.0
        bar = tqdm(total=spec.max_steps, desc=f"zoo {spec.name}", disable=not progress)
        step = 0
        while step < spec.max_steps:
            idx = torch.randint(0, ids_NL.shape[0], (spec.batch_size,), generator=order)
            loss = model(input_ids=ids_NL[idx], labels=labels_NL[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            # Evaluate often near the student threshold (tiny models jump), rarely after.
            near = student is None and bool(history) and history[-1][1] >= spec.student_min_accuracy / 2
            every = spec.fine_eval_every if near else spec.eval_every
            if step % every:
                continue
            acc = greedy_accuracy(model, tok, evals)
            history.append((step, acc))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
            if progress:
                bar.write(f"step {step}: loss {loss.item():.3f}, {spec.task} eval accuracy {acc:.3f}")
            if student is None and acc >= spec.student_min_accuracy:
                student = {k: v.detach().clone() for k, v in model.state_dict().items()}
                student_step, student_acc = step, acc
            if student is not None and acc >= spec.teacher_min_accuracy:
                teacher_acc = acc
                break
        bar.close()
        if student is None or teacher_acc < spec.teacher_min_accuracy:
            raise UserError(
                f"zoo {spec.name}: training did not reach the target accuracies in {spec.max_steps} steps "
                f"(last eval {history[-1] if history else None}); try another seed"
            )
        teacher_step = step
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder / "teacher")
        tok.save_pretrained(folder / "teacher")
        model.load_state_dict(student)
        model.save_pretrained(folder / "student")
        tok.save_pretrained(folder / "student")
        build_seconds = time.perf_counter() - start
        meta = {
            "name": spec.name,
            "task": spec.task,
            "spec": _spec_dict(spec),
            "student": {"step": student_step, "eval_accuracy": student_acc},
            "teacher": {"step": teacher_step, "eval_accuracy": teacher_acc},
            "eval_history": history,
            "num_params": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(build_seconds, 1),
            # CPU seconds / threads: the wall time on an otherwise idle machine (ours was shared).
            "build_cpu_seconds_per_thread": round((time.process_time() - cpu_start) / spec.threads, 1),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
            "machine": f"{platform.machine()}, {spec.threads} torch threads",
        }
        write_json(folder / METADATA_FILE, meta)
        return meta
    finally:
        torch.set_num_threads(threads_before)
