"""Run-folder checkpoints: Hugging Face model folders in a storage dtype, plus resumable trainer state.

Layout of a run folder::

    config.yaml  run.json  metrics.jsonl
    checkpoints/step-N/            config.json, model.safetensors (storage dtype), tokenizer files
    checkpoints/step-N/trainer_state/
        master.safetensors         fp32 master weights (the model folder may be bf16)
        optimizer.pt scheduler.pt rng.pt   torch.save of plain tensors/numbers (loaded weights_only)
        state.json                 step, data position, parameter names (optimizer order)
    final/                         the last weights in the storage dtype (fp32 with save_dtype=fp32)
    final-fp32/                    with save_dtype=both: the same weights in fp32

Every folder is written into a temporary sibling and renamed (`fileio.atomic_path`), so
a crash leaves either the previous checkpoint or the new one, never half of one; a
checkpoint counts as complete only when `trainer_state/state.json` is inside it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from opdlab.errors import UserError
from opdlab.fileio import atomic_path, read_json, write_json
from opdlab.models.state import unique_tensors

STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_model(folder: Path, model: Any, tokenizer: Any, dtype: torch.dtype,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` in HF layout at `folder` (not atomic by itself), its weights cast to `dtype`.

    The in-memory model keeps its fp32 weights: a cast copy of the state dict is saved, and
    config.json is patched to name the storage dtype so `from_pretrained(dtype="auto")` keeps it.
    """
    # `state_dict`: full tensors gathered from an FSDP-sharded model (opdlab.distill.sharded_checkpoint).
    full = model.state_dict() if state_dict is None else state_dict
    # Tied weights once (before the cast makes separate copies), as save_pretrained would write them.
    state = {k: v.detach().to(dtype) for k, v in unique_tensors(full).items()}
    model.save_pretrained(str(folder), state_dict=state)
    tokenizer.save_pretrained(str(folder))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    if "dtype" not in config and "torch_dtype" not in config:
        config["dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def master_weights(model: Any) -> dict[str, torch.Tensor]:
    """The trainable fp32 parameters by name (tied weights once), as contiguous CPU tensors."""
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from: torch CPU (and CUDA), and Python's `random`."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    """random.setstate needs tuples back where torch.save/load may hand us lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    save_dtype: str,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write `checkpoints/step-{step}/` atomically and keep only the newest `keep` checkpoints."""
    target = run_dir / "checkpoints" / f"step-{step}"
    try:
        with atomic_path(target) as tmp:
            save_model(tmp, model, tokenizer, STORAGE_DTYPES["bf16" if save_dtype == "both" else save_dtype])
            trainer = tmp / "trainer_state"
            trainer.mkdir()
            save_file(master_weights(model), str(trainer / "master.safetensors"))
            torch.save(optimizer.state_dict(), trainer / "optimizer.pt")
            torch.save(scheduler.state_dict(), trainer / "scheduler.pt")
            torch.save(rng_state(), trainer / "rng.pt")
            (trainer / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n", encoding="utf-8")
    except (OSError, RuntimeError, SafetensorError) as exc:
        # A full disk surfaces as OSError (open/write), SafetensorError or torch.save's RuntimeError
        # ("unexpected pos ..."); the temporary is gone and the previous checkpoint untouched.
        raise UserError(f"{target}: could not write the checkpoint ({_first_line(exc)}; {_free_space(run_dir)}); "
                        "the previous checkpoint is untouched; free disk space (or fix permissions), then "
                        f"resume with: opdlab distill --resume {run_dir}") from exc
    prune_checkpoints(run_dir, keep)
    return target


def save_final(run_dir: Path, model: Any, tokenizer: Any, save_dtype: str) -> Path:
    """Write `final/` (storage dtype) and, with save_dtype=both, `final-fp32/`."""
    if save_dtype == "both":
        with atomic_path(run_dir / "final-fp32") as tmp:
            save_model(tmp, model, tokenizer, torch.float32)
    with atomic_path(run_dir / "final") as tmp:
        save_model(tmp, model, tokenizer, STORAGE_DTYPES["bf16" if save_dtype == "both" else save_dtype])
    return run_dir / "final"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with trainer_state/state.json) as (step, folder), oldest first."""
    root = run_dir / "checkpoints"
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / "trainer_state" / "state.json").is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for _, folder in list_checkpoints(run_dir)[:-keep]:
        # Hide it first (one atomic rename), then delete: a crash mid-delete leaves a hidden temporary
        # (removed on resume by fileio.remove_stale_temporaries), never a visible half-deleted checkpoint.
        doomed = folder.with_name(f".{folder.name}.tmp-deleting-{os.getpid()}")
        try:
            os.replace(folder, doomed)
        except OSError:
            continue  # keeping an old checkpoint is harmless
        shutil.rmtree(doomed, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


def load_checkpoint(
    folder: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore fp32 master weights, optimizer, schedule and RNG from `folder`; return state.json.

    Everything is read with `weights_only=True` / safetensors: a checkpoint cannot run code.
    """
    trainer = folder / "trainer_state"
    try:
        state = json.loads((trainer / "state.json").read_text(encoding="utf-8"))
        master = load_file(str(trainer / "master.safetensors"))
        optim_state = torch.load(trainer / "optimizer.pt", weights_only=True)
        sched_state = torch.load(trainer / "scheduler.pt", weights_only=True)
        rng = torch.load(trainer / "rng.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as exc:
        # UnpicklingError: a file that is not plain tensors/numbers (weights_only refuses it; nothing ran).
        raise UserError(f"{folder}: cannot read the checkpoint's trainer state ({_first_line(exc)}); "
                        "delete this checkpoint folder to resume from an older one") from None
    params = dict(model.named_parameters())
    if set(master) != set(params):
        odd = sorted(set(master) ^ set(params))[0]
        raise UserError(f"{folder}: master weights do not match the student (tensor '{odd}'); resume with the run's own student")
    for name, p in params.items():
        if tuple(master[name].shape) != tuple(p.shape):
            raise UserError(f"{folder}: tensor '{name}' has shape {list(master[name].shape)} in the checkpoint but "
                            f"{list(p.shape)} in the student; resume with the run's own student (same shapes)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(master[name].to(p.device))
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(sched_state)
    set_rng_state(rng)
    return state


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    """`run.json`: status (running / finished), step, and where the models came from."""
    write_json(run_dir / "run.json", info)


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """`run.json` as written by `write_run_info` ({} when the run has none yet)."""
    path = run_dir / "run.json"
    if not path.is_file():
        return {}
    return read_json(path, fix="restore it, or delete it to continue the run from its newest checkpoint")


def finished_step(run_dir: Path) -> int | None:
    """The step a finished run ended at (run.json says finished and final/ exists, or says its weights were
    deleted on purpose: `weights_pruned`, a study arm kept for its metrics), else None."""
    info = read_run_info(run_dir)
    if info.get("status") != "finished":
        return None
    if not (run_dir / "final").is_dir() and not info.get("weights_pruned"):
        return None
    try:
        return int(info.get("step", 0))
    except (TypeError, ValueError):
        return None


def run_config_file(run_dir: Path) -> Path:
    """The config.yaml of the run folder `run_dir` continues (--resume); a UserError when there is none."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: not an opdlab run folder (no config.yaml)")
    return path
