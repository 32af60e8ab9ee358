"""`opdlab study` end to end on a tiny random pair with a minimal budget: every stage and the findings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from opdlab.cli import main
from opdlab.models.zoo import save_random_model
from opdlab.report.verdicts import NOT_MEASURED
from opdlab.subnet.masks import load_mask

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return save_random_model(root / "student", seed=1), save_random_model(root / "teacher", seed=2, hidden_size=48)


def study_yaml(tmp_path: Path) -> Path:
    config = {
        "arms": ["seeds", "sft", "rl", "subnetwork", "optimizers", "compare", "lr_sweep", "mask_discovery"], "seeds": 2,
        "discovery_fractions": [0.25, 0.5],
        "rl_samples_per_prompt": 2, "mask_atol": 0.0, "adamw_lrs": [0.003, 0.01], "sgd_lrs": [0.1, 1.0, 10.0],
        "sgd_momentum_lrs": [0.01, 0.1, 1.0], "share_start_eval": True, "prune": True,
        "train": {"run": {"steps": 4, "threads": 1, "save_every": 0}, "optim": {"lr": 0.003},
                  "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 6},
                  "data": {"task": "sort", "num_eval": 6}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_study_runs_every_stage_and_decides_from_its_files(pair, tmp_path, capsys):
    student, teacher = pair
    out = tmp_path / "study"
    argv = ["study", "--student", str(student), "--teacher", str(teacher), "--config", str(study_yaml(tmp_path)),
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "stages done" in printed and "left" in printed  # stage-level progress with the time left

    manifest = json.loads((out / "demo.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}
    expected = {"opd", "opd-seed1", "sft", "rl", "analysis-opd", "analysis-opd-seed1", "analysis-sft", "analysis-rl",
                "analysis-opd-fp32", "compare-opd-vs-rl", "compare-opd-vs-sft", "compare-sft-vs-rl",
                "compare-opd-vs-opd-seed1", "subnetwork", "mask-discovery", "optimizers", "lr-sweep", "report"}
    assert set(stages) == expected and all(s["status"] == "done" for s in stages.values())
    for s in stages.values():
        assert (out / s["path"]).exists(), s

    # the arms: the baselines' methods, the seed, and the shared step-0 evaluation
    for name, method in (("opd", "opd"), ("opd-seed1", "opd"), ("sft", "sft"), ("rl", "rl")):
        cfg = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        assert cfg["method"] == method and cfg["run"]["eval_start"] == (name == "opd")
    assert yaml.safe_load((out / "runs" / "opd-seed1" / "config.yaml").read_text())["run"]["seed"] == 1
    assert yaml.safe_load((out / "runs" / "rl" / "config.yaml").read_text())["rollout"]["samples_per_prompt"] == 2
    for name in ("opd", "opd-seed1", "sft", "rl", "opd-fp32"):  # rl may not move: a group of 2 often ties
        analysis = json.loads((out / "analysis" / name / "analysis.json").read_text())
        assert analysis["summary"]["relative_update_norm"] > 0 or name == "rl"

    # subnetwork: three masks of equal per-tensor density, one run each
    sub = json.loads((out / "experiments" / "subnetwork" / "subnetwork.json").read_text())
    assert set(sub["runs"]) == {"full", "subnetwork", "top_update", "random"}
    counts = [{k: int(v.sum()) for k, v in load_mask(out / "experiments" / "subnetwork" / "masks" / f)[0].items()}
              for f in ("subnetwork.safetensors", "top_update.safetensors", "random.safetensors")]
    assert counts[0] == counts[1] == counts[2]
    assert sub["source"]["reverse_kl_se"] > 0 and sub["runs"]["random"]["reverse_kl_start"] == sub["source"]["reverse_kl"]
    # per-prompt evaluations for paired comparisons: the source's (step 0 of the main run) and every arm's
    assert len(sub["source"]["per_example"]["reverse_kl_sum"]) == 6
    assert len(sub["runs"]["random"]["per_example"]["correct"]) == 6
    assert (out / "runs" / "opd" / "evals" / "step-0.json").is_file()
    # experiment arms keep metrics, not weights (prune); they still count as finished (resume below)
    assert not (out / "experiments" / "subnetwork" / "runs" / "random" / "final").exists()

    # telemetry: the main run and its baselines log the update; only the main run keeps mask snapshots
    logged = [json.loads(line) for line in (out / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("update/changed_fraction" in r for r in logged)
    assert sorted(p.name for p in (out / "runs" / "opd" / "masks").iterdir()) == [
        "step-1.safetensors", "step-2.safetensors", "step-3.safetensors", "step-4.safetensors"]
    assert not (out / "runs" / "sft" / "masks").exists()

    # mask discovery: early masks (25 %, 50 % of 4 steps), the source-only mask, and the subnetwork arm's runs reused
    md = json.loads((out / "experiments" / "mask_discovery" / "mask_discovery.json").read_text())
    assert list(md["arms"]) == ["step-1", "step-2", "source", "final", "random"]
    assert {k: r["cost_steps"] for k, r in md["arms"].items()} == {"step-1": 1, "step-2": 2, "source": 0, "final": 4,
                                                                    "random": 0}
    md_dir = out / "experiments" / "mask_discovery"
    assert (md_dir / md["arms"]["final"]["run_dir"]).resolve() == (out / "experiments" / "subnetwork" / "runs" /
                                                                    "subnetwork").resolve()
    final_counts = counts[0]
    for arm in ("step-1", "step-2", "source"):
        got = {k: int(v.sum()) for k, v in load_mask(md_dir / md["arms"][arm]["mask"])[0].items()}
        assert got == final_counts, arm
        assert not (md_dir / md["arms"][arm]["run_dir"] / "masks").exists()  # arms keep no snapshots of their own
    assert md["arms"]["final"]["overlap_with_final"] == 1.0

    # optimizers: AdamW at two lrs (the main run reused for its lr), SGD and SGD with momentum at three each
    opt = json.loads((out / "experiments" / "optimizers" / "optimizers.json").read_text())
    grid = {(r["optimizer"], r["lr"]) for r in opt["sweep"]}
    assert grid == {("adamw", 0.003), ("adamw", 0.01), *(("sgd", lr) for lr in (0.1, 1.0, 10.0)),
                    *(("sgd_momentum", lr) for lr in (0.01, 0.1, 1.0))}
    reused = next(r for r in opt["sweep"] if (r["optimizer"], r["lr"]) == ("adamw", 0.003))
    assert (out / "experiments" / "optimizers" / reused["run_dir"]).resolve() == (out / "runs" / "opd").resolve()
    assert set(opt["second_moment_cv"]) == {"opd", "sft", "rl"}   # read back after the optimizer state was pruned
    assert not (out / "runs" / "sft" / "checkpoints").exists() and not (out / "runs" / "sft" / "final-fp32").exists()
    assert (out / "runs" / "opd" / "final-fp32").is_dir() and (out / "runs" / "sft" / "adam_evidence.json").is_file()
    assert len(json.loads((out / "sweep" / "lr_sweep.json").read_text())["points"]) == 2

    # findings: every claim measured, claims 3 and 4 say which metric decided
    findings = json.loads((out / "report" / "findings.json").read_text())["findings"]
    assert [f["number"] for f in findings] == list(range(1, 9))
    assert all(f["verdict"] != NOT_MEASURED for f in findings), [(f["number"], f["caveat"]) for f in findings]
    by_number = {f["number"]: f for f in findings}
    for n in (3, 4):
        assert by_number[n]["values"]["metric"] in ("accuracy", "reverse_kl")
        assert "decided" in by_number[n]["caveat"]
    assert "top_update_mask" in by_number[3]["values"]
    assert (out / "report" / "report.html").is_file()
    summary = json.loads((out / "report" / "findings.json").read_text())["mask_discovery"]
    assert [r["arm"] for r in summary["arms"]] == list(md["arms"]) and summary["statement"]
    assert "Early subnetwork discovery" in (out / "report" / "report.html").read_text()

    # resuming a finished study runs nothing again
    assert main(argv + ["--resume"]) == 0
    assert printed.count("[skip]") == 0 and capsys.readouterr().out.count("[skip]") == len(expected)
