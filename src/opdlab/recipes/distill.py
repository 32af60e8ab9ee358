"""`opdlab distill`: train a student by on-policy distillation (or the sft / rl baselines).

    opdlab distill --out runs/opd                               # the built-in pair, method opd
    opdlab distill --method sft --steps 50 --out runs/sft
    opdlab distill --student S --teacher T --prompts p.jsonl --out runs/mine
    opdlab distill --resume runs/opd                            # continue from the newest checkpoint

Returns the run folder (config.yaml, metrics.jsonl, checkpoints/, final/); see docs/training.md.
"""

from __future__ import annotations

from pathlib import Path

from opdlab.config import DistillConfig
from opdlab.devices import check_device
from opdlab.dist.runtime import init_from_env
from opdlab.distill.checkpoint import finished_step, list_checkpoints, run_config_file
from opdlab.distill.train import train
from opdlab.errors import UserError
from opdlab.fileio import prepare_out_dir, remove_stale_temporaries


def _quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advice; our own bar shows progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def distill(cfg: DistillConfig, *, progress: bool = True) -> Path:
    """Train as `cfg` says into `cfg.out` (continuing the run in `cfg.resume` when set); return the run folder."""
    _quiet_transformers()
    check_device(cfg.model.device, "model.device")
    ctx = init_from_env(cfg.model.device)  # under torchrun rank 0 prepares the folder, the others wait
    if cfg.resume is None:
        inputs = {"--student": cfg.model.student, "--teacher": cfg.model.teacher, "--prompts": cfg.data.prompts,
                  "data.eval_prompts": cfg.data.eval_prompts, "--mask": cfg.optim.mask}
        return train(cfg, ctx.run_on_main(lambda: prepare_out_dir(cfg.out, cfg.overwrite, inputs)), progress=progress)

    run_dir = Path(cfg.resume)
    run_config_file(run_dir)  # a UserError unless it is a run folder
    if Path(cfg.out).resolve() != run_dir.resolve():
        raise UserError(f"--resume {run_dir} continues in its own folder; drop --out {cfg.out} (or copy the run first)")
    done = finished_step(run_dir)
    if done is not None and done >= cfg.run.steps:
        return run_dir  # nothing left to do; raise --steps to train further
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise UserError(f"--resume {run_dir}: no complete checkpoint to continue from; start again with --overwrite")
    step, folder = checkpoints[-1]
    if ctx.is_main:
        for where in (run_dir, run_dir / "checkpoints"):  # half-written or half-deleted leftovers of a killed run
            remove_stale_temporaries(where)
    ctx.barrier()
    if step > cfg.run.steps:
        raise UserError(f"--resume {run_dir}: the newest checkpoint is step {step}, beyond --steps {cfg.run.steps}")
    return train(cfg, run_dir, resume_from=folder, progress=progress)
