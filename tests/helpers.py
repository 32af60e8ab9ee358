"""Helpers shared by the test tiers (importable as `helpers`: pyproject's pytest `pythonpath`).

Synthetic result files in the formats of docs/formats.md, for the findings and report tests:
    analysis(sparsity=0.8)           an analysis.json dict (FAILING_ANALYSIS: every claim fails on it)
    subnetwork(), optimizers()       subnetwork.json / optimizers.json dicts
    write_run / write_analysis       a run folder / an analysis folder on disk
    write_demo(root)                 a whole demo folder; run_report(path) renders it
Running the CLI under faults (tests/faults):
    distill_args(pair, out, steps)   a small `opdlab distill` command line
    cli_error(argv, capsys)          run it in-process, check it fails with one error line, return the line
    spawn(argv), logged_steps(run)   `python -m opdlab` as a subprocess; the steps its metrics.jsonl logged
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from opdlab.cli import main

# ----------------------------------------------------------------------------- synthetic result files


def analysis(sparsity=0.8, rel=0.003, rank=0.97, top8=0.62, e_both=0.008, e_rand=0.01, low_mag=1.4,
             layer_norms=(0.003, 0.004, 0.0035, 0.0025), mlp=0.004, attn=0.0025) -> dict:
    """An analysis.json dict in the format of docs/formats.md."""
    return {
        "schema": 1, "base": "source", "tuned": "runs/opd/final", "dtype": "bf16",
        "summary": {"sparsity": sparsity, "sparsity_atol_1e-05": min(1.0, sparsity + 0.05), "relative_update_norm": rel,
                    "median_rank_fraction_tol_1e-05": rank, "median_top8_energy": top8, "median_stable_rank": 3.1,
                    "principal_energy_both_rho_0.1": e_both, "principal_energy_both_rho_0.1_random": e_rand,
                    "low_magnitude_enrichment_rho_0.1": low_mag, "principal_mask_enrichment_rho_0.1": 0.7,
                    "num_params": 1_000_000, "num_tensors": 30, "sparsity_fp32": 0.02, "below_half_ulp_fraction": 0.78},
        "groups": {
            "layer": [{"layer": i, "numel": 1000, "sparsity": sparsity, "sparsity_atol_1e-05": sparsity,
                       "relative_update_norm": v, "energy_share": 0.25}
                      for i, v in enumerate(layer_norms)] + [{"layer": "embed", "numel": 10, "sparsity": 1.0,
                                                              "relative_update_norm": 0.0, "energy_share": 0.0}],
            "module": [],
            "block": [{"block": "mlp", "numel": 2000, "sparsity": sparsity, "relative_update_norm": mlp,
                       "energy_share": 0.6},
                      {"block": "attention", "numel": 2000, "sparsity": sparsity, "relative_update_norm": attn,
                       "energy_share": 0.4}]},
    }


FAILING_ANALYSIS = analysis(sparsity=0.01, rel=0.25, rank=0.3, top8=0.1, e_both=0.2, e_rand=0.01, low_mag=0.95,
                            layer_norms=(0.3, 0.01), mlp=0.2, attn=0.3)


def subnetwork(full=0.6, opd=0.58, rand=0.3, source=0.1, n=512) -> dict:
    """A subnetwork.json dict as `opdlab experiment subnetwork` writes it."""
    return {"schema": 1, "kind": "subnetwork", "num_eval": n,
            "source": {"path": "source", "accuracy": source, "reverse_kl": 1.0},
            "mask": {"file": "masks/subnetwork.safetensors", "atol": 0.0, "dtype": "bf16", "density": 0.2},
            "runs": {"full": {"run_dir": "runs/full", "mask": None, "accuracy": full, "reverse_kl": 0.2,
                              "trainable_fraction": 1.0},
                     "subnetwork": {"run_dir": "runs/subnetwork", "accuracy": opd, "reverse_kl": 0.25,
                                    "trainable_fraction": 0.2,
                                    "close_to_full": {"frac_equal_1e-5": 0.9, "relative_distance": 0.1}},
                     "random": {"run_dir": "runs/random", "accuracy": rand, "reverse_kl": 0.6,
                                "trainable_fraction": 0.2,
                                "close_to_full": {"frac_equal_1e-5": 0.3, "relative_distance": 0.8}}}}


def optimizers(adamw=(0.4, 0.6, 0.5), sgd=(0.1, 0.2, 0.15), sgdm=(0.15, 0.3, 0.2), n=512) -> dict:
    grids = {"adamw": (1e-4, 3e-4, 1e-3), "sgd": (1e-2, 3e-2, 1e-1), "sgd_momentum": (1e-3, 3e-3, 1e-2)}
    accs = {"adamw": adamw, "sgd": sgd, "sgd_momentum": sgdm}
    return {"schema": 1, "num_eval": n,
            "sweep": [{"optimizer": o, "lr": lr, "accuracy": a, "reverse_kl": 1 - a, "run_dir": f"runs/{o}-{lr}"}
                      for o in grids for lr, a in zip(grids[o], accs[o])],
            "second_moment_cv": {m: {"run_dir": f"runs/{m}", "median_cv": cv, "mean_cv": cv}
                                 for m, cv in (("opd", 1.3), ("sft", 0.9), ("rl", 1.1))}}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def write_run(folder: Path, method: str, steps: int = 20, optimizer: str = "adamw", lr: float = 1e-5,
              final_acc: float = 0.6, num_eval: int = 128) -> None:
    """A run folder as `opdlab distill` writes it: config.yaml, metrics.jsonl (step 0 eval only), final/."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "method": method, "optim": {"optimizer": optimizer, "lr": lr}, "run": {"steps": steps},
        "data": {"num_eval": num_eval}}), encoding="utf-8")
    lines = [{"step": 0, "eval/accuracy": 0.1, "eval/reverse_kl": 1.0}]
    for s in range(1, steps + 1):
        row = {"step": s, "train/loss": 1.0 / s, "train/reverse_kl": 1.0 / s, "train/reward": 0.0,
               "train/grad_norm": 1.0, "train/lr": lr, "train/completion_tokens": 64, "train/tokens_per_s": 1000.0,
               "time/rollout_s": 0.1, "time/score_s": 0.05, "time/update_s": 0.05}
        if s % 5 == 0:
            row.update({"eval/accuracy": 0.1 + (final_acc - 0.1) * s / steps, "eval/reverse_kl": 1.0 / (1 + s)})
        lines.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    (folder / "final").mkdir(exist_ok=True)
    (folder / "final" / "config.json").write_text("{}", encoding="utf-8")


def write_analysis(folder: Path, data: dict, tuned: str, dtype: str = "bf16", png: bool = True) -> None:
    data = dict(data, base="source", tuned=tuned, dtype=dtype)
    write_json(folder / "analysis.json", data)
    rows = ["name,layer,module,block,shape,numel,sparsity,relative_update_norm"]
    rows += [f"model.layers.{i}.mlp.up_proj.weight,{i},up,mlp,128x512,65536,0.8,0.003" for i in range(4)]
    rows += ["model.norm.weight,,norm,norm,128,128,1.0,0.0"]
    (folder / "tensors.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    if png:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(2, 1.5))
        fig.add_subplot().plot([0, 1], [1, 0])
        fig.savefig(folder / "sparsity_by_layer.png")


def write_demo(root: Path, holds: bool = True) -> Path:
    """A complete synthetic demo folder; every claim holds (or, with holds=False, fails)."""
    for m in ("opd", "sft", "rl"):
        write_run(root / "runs" / m, m)
    opd = analysis() if holds else FAILING_ANALYSIS
    sft = analysis(sparsity=0.1, rel=0.05, e_both=0.05, low_mag=1.0) if holds else FAILING_ANALYSIS
    rl = analysis(sparsity=0.85, rel=0.002, e_both=0.009, low_mag=1.5)
    for m, data in (("opd", opd), ("sft", sft), ("rl", rl)):
        write_analysis(root / "analysis" / m, data, tuned=f"../../runs/{m}/final", png=(m == "opd"))
    write_analysis(root / "analysis" / "opd-fp32", analysis(sparsity=0.02), tuned="../../runs/opd/final", dtype="fp32",
                   png=False)
    write_json(root / "compare" / "opd-vs-rl" / "compare.json", {
        "schema": 1, "base": "source", "run_a": "runs/opd", "run_b": "runs/rl", "dtype": "bf16", "atol": 0.0,
        "summary": {"jaccard": 0.3, "jaccard_random": 0.1, "jaccard_ratio": 3.0, "coverage_a": 0.5,
                    "coverage_a_random": 0.2, "coverage_a_ratio": 2.5, "coverage_b": 0.4, "coverage_b_random": 0.2,
                    "coverage_b_ratio": 2.0, "density_a": 0.2, "density_b": 0.2}, "groups": {}})
    write_json(root / "experiments" / "subnetwork" / "subnetwork.json", subnetwork() if holds else subnetwork(rand=0.59))
    write_json(root / "experiments" / "optimizers" / "optimizers.json",
               optimizers() if holds else optimizers(sgdm=(0.2, 0.65, 0.3)))
    points = []
    for i, lr in enumerate((1e-6, 1e-5, 1e-4)):
        d = f"analysis/lr-{lr:g}"
        write_analysis(root / "experiments" / "lr_sweep" / d, analysis(sparsity=0.9 - 0.4 * i), tuned=f"lr{i}", png=False)
        points.append({"lr": lr, "sparsity_bf16": 0.9 - 0.4 * i, "sparsity_fp32": 0.01, "below_half_ulp_fraction":
                       0.88 - 0.4 * i, "relative_update_norm": 1e-3 * 10 ** i, "accuracy": 0.2 + 0.1 * i,
                       "analysis_dir": d, "run_dir": f"runs/lr-{lr:g}"})
    write_json(root / "experiments" / "lr_sweep" / "lr_sweep.json", {"schema": 1, "method": "opd", "points": points})
    write_json(root / "demo.json", {"schema": 1, "preset": "quick", "total_s": 171.0, "stages": [
        {"name": "opd", "kind": "run", "path": "runs/opd", "seconds": 30.5, "status": "done"},
        {"name": "analysis-opd", "kind": "analysis", "path": "analysis/opd", "seconds": 4.2, "status": "done"}]})
    return root


def run_report(path: Path, *extra: str) -> Path:
    assert main(["report", str(path), *extra]) == 0
    out = Path(extra[extra.index("--out") + 1]) if "--out" in extra else path / "report"
    return out / "report.html"


# ----------------------------------------------------------------------------- the CLI under faults


REPO = Path(__file__).resolve().parents[1]

# Small enough that a step takes ~0.1 s on a busy core; every fault test trains with these.
SMALL = ["--set", "rollout.prompts_per_step=4", "--set", "rollout.samples_per_prompt=2",
         "--set", "rollout.max_new_tokens=6", "--set", "data.num_eval=4", "--set", "run.threads=1"]


def distill_args(pair: tuple[Path, Path], out: Path, steps: int, *extra: str) -> list[str]:
    return ["distill", "--student", str(pair[0]), "--teacher", str(pair[1]), "--task", "addition",
            "--steps", str(steps), "--out", str(out), "--lr", "3e-3", *SMALL, *extra]


def cli_error(argv: list[str], capsys, code: int = 2) -> str:
    """Run the CLI in-process, expect exit `code`, no traceback and exactly one error line; return it."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == code, f"exit {rc}, stderr:\n{err}"
    return error_line(argv, out, err)


def cli_outcome(argv: list[str], capsys) -> str | None:
    """Run the CLI in-process and accept only exit 0 (None) or exit 2 with one error line (returned)."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc in (0, 2), f"exit {rc}, stderr:\n{err}"
    assert "Traceback" not in err, err
    return error_line(argv, out, err) if rc == 2 else None


def error_line(argv: list[str], out: str, err: str) -> str:
    """The one `opdlab CMD:` line of a failed command's stderr, after checking nothing else is there."""
    assert "[y/N]" not in out + err, "an interactive prompt was shown (trust_remote_code left unset?)"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"opdlab {argv[0]}:")]
    assert len(lines) == 1, err
    # Nothing else on stderr but progress bars and warnings (lines that carry a progress bar's '|' or 'Warning').
    others = [ln for ln in err.splitlines() if ln.strip() and ln not in lines and "|" not in ln and "Warning" not in ln
              and "warnings.warn" not in ln]
    assert not others, err
    return lines[0]


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    """`python -m opdlab ARGV` as a real subprocess (stdout/stderr piped)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "opdlab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=kwargs.pop("cwd", REPO), **kwargs)


def logged_steps(run: Path) -> list[int]:
    """Steps in metrics.jsonl, tolerating a torn last line (as `fileio.read_jsonl` does)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    steps = []
    for i, line in enumerate(lines):
        try:
            steps.append(int(json.loads(line)["step"]))
        except json.JSONDecodeError:
            assert i == len(lines) - 1, f"{path}: torn line {i + 1} is not the last one"
    return steps


def tree_digest(path: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (size, sha256)} of every file under `path` (or of `path` itself): equal means untouched."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in files}
