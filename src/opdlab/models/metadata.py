"""What a model folder's config.json claims, checked against its types and its weights before loading.

    check_model_config(Path("models/student"), "student")   # UserError naming config.json and the field
    learned_position_limit(model)                            # 1024 for GPT-2, None for rotary models

transformers turns a config.json of the wrong shape into TypeErrors, ZeroDivisionErrors or a
"mismatched sizes" RuntimeError deep inside model construction; here each becomes one line naming
the file and the field. Only the safetensors headers are read (no weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from opdlab.errors import UserError
from opdlab.fileio import read_json, shard_files

# Sizes that must be positive integers where a config.json has them (Llama/Qwen names, then GPT-2's).
POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "max_position_embeddings", "n_positions", "n_embd", "n_layer", "n_head")
# Tensor names of a language model's token embedding (its rows are the vocabulary).
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
# Modules holding learned absolute position embeddings (GPT-2, GPT-Neo, OPT, BERT-style).
POSITION_MODULES = ("wpe", "embed_positions", "position_embeddings")


def read_config(folder: Path, role: str) -> dict[str, Any]:
    """config.json of a model folder as a JSON object, or a UserError naming it (and the flag)."""
    try:
        return read_json(folder / "config.json", "re-save the model")
    except UserError as exc:
        raise UserError(f"--{role} {exc}") from None


def check_model_config(folder: Path, role: str) -> None:
    """Refuse a config.json whose sizes are not positive integers or whose vocab_size differs from the
    token embedding's rows in the weights (`role` is student or teacher, for the message)."""
    config = read_config(folder, role)
    path = folder / "config.json"
    scopes = [("", config)] + [(f"{k}.", v) for k, v in config.items() if k == "text_config" and isinstance(v, dict)]
    for prefix, scope in scopes:
        for field in POSITIVE_INTS:
            value = scope.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"--{role} {path}: field '{prefix}{field}' must be a positive integer, got {value!r}; "
                                "fix config.json or re-save the model")
    vocab = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size")
                       if isinstance(config.get("text_config"), dict) else None)
    found = _embedding_rows(folder)
    if isinstance(vocab, int) and found is not None and found[1] != vocab:
        name, rows = found
        raise UserError(f"--{role} {path}: vocab_size is {vocab} but the weights' '{name}' has {rows} rows; "
                        "config.json and the weights are from different models")


def _embedding_rows(folder: Path) -> tuple[str, int] | None:
    """(name, rows) of the first token-embedding tensor in the folder's safetensors headers, if any."""
    files = shard_files(folder) or sorted(folder.glob("*.safetensors"))
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    if key.endswith(EMBEDDING_SUFFIXES) and "vision" not in key:
                        shape = fh.get_slice(key).get_shape()
                        return (key, int(shape[0])) if shape else None
        except (SafetensorError, OSError, ValueError):
            return None  # a damaged file: the loader reports it with its own message
    return None


def learned_position_limit(model: Any) -> int | None:
    """Positions (prompt plus completion) a model with learned absolute position embeddings can take;
    None for rotary or ALiBi models, which have no table to run past."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_MODULES:
            declared = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
            return min(module.num_embeddings, declared) if isinstance(declared, int) else module.num_embeddings
    return None
