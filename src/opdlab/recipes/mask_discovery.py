"""`opdlab experiment mask-discovery`: can the subnetwork be found before the full run has been paid for?

    opdlab experiment mask-discovery --out runs/discovery                      # full OPD run with mask snapshots, then the arms
    opdlab experiment mask-discovery --set "discovery_fractions=[0.1, 0.5]" --out runs/discovery

(1) One full OPD run that measures its update every `discovery_every` steps and saves each
changed mask (run.track_update_every, run.save_update_masks). (2) The final mask: the coordinates
it changed (|delta| > mask_atol in mask_dtype), whose per-tensor density every arm keeps.
(3) Retraining from the source, same prompts, seed and budget, on masks of that density:
  step-K          the full run's changed mask after K steps (the first snapshot at or after each of
                  `discovery_fractions` of the run), resized per tensor to the final density: a random
                  subset when it holds more, filled up at random when it holds fewer (subnet/discovery.py)
  source          the lowest-|W| coordinates of the source: costs no training at all
  final           the final mask (the subnetwork experiment's arm)
  random          a random mask: the control
Writes `mask_discovery.json` (docs/formats.md): per arm the steps of the full run it cost to find
the mask, its held-out figures, the share of its coordinates inside the final mask against chance,
and how much of the early snapshot survived the resizing. The report turns it into recoveries of
the full run's gain, by the subnetwork claim's rule (report/claims_experiments.py).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

from opdlab.config import ExperimentConfig
from opdlab.errors import UserError
from opdlab.fileio import relative_path, write_json
from opdlab.recipes.arms import EVAL_KEYS, final_eval, opd_arm, source_of, train_arm
from opdlab.subnet.discovery import lowest_magnitude_like, match_density, overlap_with
from opdlab.subnet.masks import MaskDict, density, extract_mask, load_mask, mask_metadata, random_like, save_mask

# what every masked arm turns off: its own telemetry (only the full run's snapshots are needed)
UNTRACKED = {"run.track_update_every": 0, "run.save_update_masks": False}


def tracked_every(cfg: ExperimentConfig) -> int:
    """The full run's measurement interval: `discovery_every`, else about a tenth of the run."""
    return cfg.discovery_every or max(1, cfg.train.run.steps // 10)


def snapshot_files(run_dir: Path) -> dict[int, Path]:
    """A run's mask snapshots (masks/step-N.safetensors) by step."""
    found = {}
    for path in (run_dir / "masks").glob("step-*.safetensors"):
        m = re.fullmatch(r"step-(\d+)\.safetensors", path.name)
        if m:
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def discovery_steps(snapshots: dict[int, Path], fractions: list[float], steps: int) -> list[int]:
    """For each fraction, the first snapshot step at or after fraction x steps, before the last step (no repeats)."""
    chosen: list[int] = []
    for f in sorted(fractions):
        later = [s for s in snapshots if s >= f * steps and s < steps]
        if later and later[0] not in chosen:
            chosen.append(later[0])
    return chosen


def run_mask_discovery(cfg: ExperimentConfig, out: Path, progress: bool = True, full_run: Path | None = None,
                       final_mask: Path | None = None, reuse: dict[str, tuple[Path, Path]] | None = None,
                       arm_overrides: dict[str, Any] | None = None,
                       after_arm: Callable[[Path], None] | None = None) -> Path:
    """The experiment of the module docs into `out`; returns mask_discovery.json.

    `full_run` reuses a finished run with mask snapshots (a study's main run), `final_mask` its
    final mask file, `reuse` maps the arms "final" and "random" to (finished run, its mask file):
    runs trained on exactly `final_mask` and its random control (a study's subnetwork arms). `arm_overrides` and
    `after_arm` are as in `run_subnetwork`.
    """
    started = time.time()
    train = opd_arm(cfg.train)
    train.run.save_dtype = "both"
    steps = train.run.steps
    if full_run is None:
        full_run = train_arm(train, out / "runs" / "full", {"run.track_update_every": tracked_every(cfg),
                                                             "run.save_update_masks": True}, progress)
    source = source_of(full_run)
    snapshots = snapshot_files(full_run)
    if not snapshots:
        raise UserError(f"{full_run / 'masks'}: no mask snapshots (step-N.safetensors); train the full run with "
                        "run.track_update_every N and run.save_update_masks true")

    masks_dir = out / "masks"
    if final_mask is None:
        final_mask = masks_dir / "final.safetensors"
        if not final_mask.is_file():
            found = extract_mask(source, full_run, atol=cfg.mask_atol, dtype=cfg.mask_dtype, progress=progress)
            save_mask(final_mask, found, mask_metadata("extract", found, base=str(source), tuned=str(full_run),
                                                       atol=cfg.mask_atol, dtype=cfg.mask_dtype), packed=True)
    final = load_mask(final_mask)[0]

    # (name, mask file, steps of the full run paid to find it, the snapshot it came from)
    arms: list[tuple[str, Path, int, Path | None]] = []
    for step in discovery_steps(snapshots, cfg.discovery_fractions, steps):
        arms.append((f"step-{step}", masks_dir / f"step-{step}.safetensors", step, snapshots[step]))
    arms.append(("source", masks_dir / "source.safetensors", 0, None))
    arms.append(("final", final_mask, steps, None))
    arms.append(("random", masks_dir / "random.safetensors", 0, None))
    reuse = reuse or {}
    rows: dict[str, dict[str, Any]] = {}
    for name, mask_file, cost, snapshot in arms:
        early = load_mask(snapshot)[0] if snapshot is not None else None
        if name in reuse:
            run_dir, mask_file = reuse[name]
            mask = load_mask(mask_file)[0]
        else:
            mask = (final if mask_file == final_mask else load_mask(mask_file)[0] if mask_file.is_file()
                    else _build_mask(name, mask_file, final, source, early, snapshot, cfg.train.run.seed))
            run_dir = train_arm(train, out / "runs" / name,
                                {**(arm_overrides or {}), **UNTRACKED, "optim.mask": str(mask_file)}, progress)
        overlap, chance = overlap_with(mask, final)
        row: dict[str, Any] = {"run_dir": relative_path(run_dir, out), "mask": relative_path(mask_file, out),
                               "cost_steps": cost, "trainable_fraction": density(mask),
                               "overlap_with_final": overlap, "overlap_chance": chance,
                               "enrichment": overlap / chance if chance else None}
        if early is not None:
            kept = sum(int((mask[k] & early[k]).sum()) for k in mask)
            row.update(snapshot=relative_path(snapshot, out), snapshot_density=density(early),
                       from_snapshot=kept / max(sum(int(m.sum()) for m in mask.values()), 1))
        row.update(final_eval(run_dir, start_from=full_run))
        if after_arm is not None and name not in reuse:
            after_arm(run_dir)
        rows[name] = row
    ev = final_eval(full_run)
    result = {
        "schema": 1, "kind": "mask-discovery", "num_eval": train.data.num_eval, "steps": steps,
        "snapshot_steps": list(snapshots),
        "source": {"path": relative_path(source, out),
                   **{k: ev[f"{k}_start"] for k in EVAL_KEYS if ev.get(f"{k}_start") is not None},
                   **({"per_example": ev["per_example_start"]} if ev.get("per_example_start") else {})},
        "full": {"run_dir": relative_path(full_run, out), "cost_steps": steps,
                 **{k: ev[k] for k in EVAL_KEYS + ("per_example",) if ev.get(k) is not None}},
        "final_mask": {"file": relative_path(final_mask, out), "density": density(final),
                       "atol": cfg.mask_atol, "dtype": cfg.mask_dtype},
        "arms": rows,
        "seconds": round(time.time() - started, 1),
    }
    return write_json(out / "mask_discovery.json", result)


def _build_mask(name: str, path: Path, final: MaskDict, source: Path, early: MaskDict | None,
                snapshot: Path | None, seed: int) -> MaskDict:
    """One arm's mask at the final per-tensor counts, saved bit-packed at `path`; returned."""
    if early is not None:
        built = match_density(early, final, seed=seed)
        meta = mask_metadata("match_density", built, snapshot=str(snapshot), seed=seed)
    elif name == "source":
        built = lowest_magnitude_like(source, final)
        meta = mask_metadata("lowest_magnitude_like", built, source=str(source))
    else:
        built = random_like(final, seed=seed)
        meta = mask_metadata("random_like", built, seed=seed)
    save_mask(path, built, meta, packed=True)
    return built
