"""`opdlab experiment subnetwork | optimizers` end to end on tiny random models (a few steps per arm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdlab.cli import main
from opdlab.models.zoo import save_random_model
from opdlab.subnet.masks import load_mask

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return save_random_model(root / "student", seed=1), save_random_model(root / "teacher", seed=2, hidden_size=48)


def _settings(pair, steps: int = 2) -> list[str]:
    student, teacher = pair
    out = []
    for item in (f"train.model.student={student}", f"train.model.teacher={teacher}", "train.data.task=sort",
                 f"train.run.steps={steps}", "train.rollout.prompts_per_step=4", "train.rollout.samples_per_prompt=2",
                 "train.rollout.max_new_tokens=6", "train.data.num_eval=6", "train.run.threads=1",
                 "train.optim.lr=0.003"):
        out += ["--set", item]
    return out


def test_subnetwork_experiment_retrains_only_the_mask(pair, tmp_path):
    out = tmp_path / "sub"
    assert main(["experiment", "subnetwork", "--out", str(out), *_settings(pair)]) == 0
    result = json.loads((out / "subnetwork.json").read_text())
    assert result["schema"] == 1 and set(result["runs"]) == {"full", "subnetwork", "random"}
    masks, meta = load_mask(out / "masks" / "subnetwork.safetensors")
    control, _ = load_mask(out / "masks" / "random.safetensors")
    # The random control has exactly the subnetwork's per-tensor density but other coordinates.
    assert {k: int(v.sum()) for k, v in masks.items()} == {k: int(v.sum()) for k, v in control.items()}
    assert any(not torch.equal(masks[k], control[k]) for k in masks if 0 < masks[k].sum() < masks[k].numel())
    density = sum(int(v.sum()) for v in masks.values()) / sum(v.numel() for v in masks.values())
    assert result["runs"]["subnetwork"]["trainable_fraction"] == pytest.approx(density)
    # Outside its mask, the random-mask run kept the source weights bit for bit.
    source = load_file(str(pair[0] / "model.safetensors"))
    tuned = load_file(str(out / result["runs"]["random"]["run_dir"] / "final-fp32" / "model.safetensors"))
    for name, keep in control.items():
        if name in source:
            assert torch.equal(tuned[name][~keep], source[name][~keep]), name
    close = result["runs"]["subnetwork"]["close_to_full"]
    assert 0.0 <= close["frac_equal_1e-5"] <= 1.0 and close["relative_distance"] >= 0.0
    # Resuming a finished experiment keeps every arm and rewrites the same summary.
    assert main(["experiment", "subnetwork", "--out", str(out), "--resume", *_settings(pair)]) == 0
    again = json.loads((out / "subnetwork.json").read_text())
    assert again["runs"]["subnetwork"]["accuracy"] == result["runs"]["subnetwork"]["accuracy"]


def test_optimizer_experiment_sweeps_and_measures_second_moment(pair, tmp_path):
    out = tmp_path / "opt"
    extra = ["--set", "adamw_lrs=[0.001, 0.003]", "--set", "sgd_lrs=[0.1]", "--set", "evidence_methods=[opd, sft]"]
    assert main(["experiment", "optimizers", "--out", str(out), *_settings(pair), *extra]) == 0
    result = json.loads((out / "optimizers.json").read_text())
    assert [(r["optimizer"], r["lr"]) for r in result["sweep"]] == [
        ("adamw", 0.001), ("adamw", 0.003), ("sgd", 0.1), ("sgd_momentum", 0.1)]
    assert set(result["best"]) == {"adamw", "sgd", "sgd_momentum"}
    assert set(result["second_moment_cv"]) == {"opd", "sft"}
    for method, row in result["second_moment_cv"].items():
        assert row["median_cv"] > 0, method
        assert all(name.endswith(("weight", "bias")) for name in row["per_tensor"]), method


def test_bad_experiment_settings_are_one_line_errors(tmp_path, capsys):
    assert main(["experiment", "optimizers", "--out", str(tmp_path / "x"), "--set", "sgd_lrs=[-1]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sgd_lrs" in err


def test_optimizer_experiment_keeps_self_distillation(pair, tmp_path):
    """train.method=opsd stays opsd in every arm (the student is its own teacher; no --teacher needed)."""
    out = tmp_path / "opt-opsd"
    flat = _settings(pair, steps=1)
    settings = [x for key, value in zip(flat[::2], flat[1::2]) if not value.startswith("train.model.teacher=")
                for x in (key, value)]
    extra = ["--set", "train.method=opsd", "--set", "adamw_lrs=[0.003]", "--set", "sgd_lrs=[0.1]",
             "--set", "evidence_methods=[opd]"]
    assert main(["experiment", "optimizers", "--out", str(out), *settings, *extra]) == 0
    result = json.loads((out / "optimizers.json").read_text())
    for row in result["sweep"]:
        info = json.loads((out / row["run_dir"] / "run.json").read_text())  # paths are relative to the file
        assert info["method"] == "opsd" and info["teacher"] == info["student"]


def test_mask_discovery_experiment_trains_every_arm_at_the_final_density(pair, tmp_path):
    out = tmp_path / "md"
    extra = ["--set", "discovery_fractions=[0.5]", "--set", "discovery_every=2"]
    assert main(["experiment", "mask-discovery", "--out", str(out), *_settings(pair, steps=4), *extra]) == 0
    result = json.loads((out / "mask_discovery.json").read_text())
    assert result["kind"] == "mask-discovery" and result["snapshot_steps"] == [2, 4]
    assert list(result["arms"]) == ["step-2", "source", "final", "random"]
    final, _ = load_mask(out / "masks" / "final.safetensors")
    want = {k: int(v.sum()) for k, v in final.items()}
    for name, row in result["arms"].items():
        mask, _ = load_mask(out / row["mask"])
        assert {k: int(v.sum()) for k, v in mask.items()} == want, name
        assert row["accuracy"] is not None and row["reverse_kl_start"] == result["source"]["reverse_kl"], name
    early = result["arms"]["step-2"]
    assert 0 < early["snapshot_density"] and 0 < early["from_snapshot"] <= 1
    assert result["arms"]["final"]["overlap_with_final"] == 1.0
    assert 0 < early["overlap_chance"] < 1 and early["enrichment"] == pytest.approx(
        early["overlap_with_final"] / early["overlap_chance"])
    assert main(["experiment", "mask-discovery", "--out", str(out), "--resume", *_settings(pair, steps=4), *extra]) == 0


def test_mask_discovery_refuses_a_full_run_without_snapshots(pair, tmp_path):
    from opdlab.config import ExperimentConfig, load_config
    from opdlab.errors import UserError
    from opdlab.recipes.mask_discovery import run_mask_discovery

    out = tmp_path / "sub"
    assert main(["experiment", "subnetwork", "--out", str(out), *_settings(pair)]) == 0
    cfg = load_config(ExperimentConfig, None, {"kind": "mask-discovery"})
    with pytest.raises(UserError, match="no mask snapshots"):
        run_mask_discovery(cfg, tmp_path / "md", full_run=out / "runs" / "full")
