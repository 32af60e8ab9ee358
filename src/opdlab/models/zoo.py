"""The built-in tiny teacher/student pairs: their specs, the shipped weights, the cache.

    paths = build_pair("sort-tiny")           # copies the shipped pair into the cache (fast)
    model = AutoModelForCausalLM.from_pretrained(paths.student)
    tok = AutoTokenizer.from_pretrained(paths.student)

The weights ship inside the package (`opdlab/zoo_data/NAME/`); this module only copies, finds
and describes them. How a pair is trained from its spec's seed, and where that deviates from
the study, is `opdlab.recipes.zoo_train` (`opdlab zoo build NAME --rebuild`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from opdlab.errors import UserError
from opdlab.fileio import atomic_path
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
    return _is_complete(target) and read_metadata(target).get("spec") == spec_dict(get_spec(name))


def approx_params(spec: PairSpec) -> int:
    """Parameters per model of a pair (untied embeddings, no biases), without building it."""
    h, v = spec.hidden_size, len(build_tokenizer())
    per_layer = 4 * h * h + 3 * h * spec.intermediate_size + 2 * h
    return spec.num_layers * per_layer + 2 * v * h + h


def build_pair(name: str = "sort-tiny") -> PairPaths:
    """Return the cached pair `name`, copying the weights shipped in the package into the cache first.

    A cached pair built from a different spec is replaced by the shipped one. Training a pair
    from its seed is `opdlab zoo build NAME --rebuild` (`opdlab.recipes.zoo_train`).
    """
    spec = get_spec(name)
    target = pair_dir(name)
    if is_cached(name):
        return _paths(spec, target)
    shipped = shipped_dir(name)
    if shipped is None:
        raise UserError(f"pair {name!r}: no weights ship with this install and none are cached; "
                        f"train them with `opdlab zoo build {name} --rebuild`")
    with atomic_path(target) as tmp:
        shutil.copytree(shipped, tmp)
    return _paths(spec, target)


def spec_dict(spec: PairSpec) -> dict[str, Any]:
    """The spec as it reads back from JSON (tuples become lists), for comparing with metadata."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


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
