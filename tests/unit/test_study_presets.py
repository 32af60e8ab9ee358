"""The study's plan and the demo presets built on it, without training anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opdlab.config import DemoConfig, StudyConfig, load_config
from opdlab.errors import UserError
from opdlab.recipes import demo, demo_real, study
from opdlab.recipes.demo_stages import Manifest


def test_tiny_demo_presets_keep_the_demo_runs_configs():
    for name, preset in demo.PRESETS.items():
        cfg = demo.tiny_study(DemoConfig(preset=name, out="x"))
        base = study.main_config(cfg)
        own = demo.base_config(preset, Path("x") / "runs" / "opd")  # the demo's own main run, plus telemetry
        own.run.track_update_every = max(1, preset.steps // 10)
        own.run.save_update_masks = preset.discovery  # the early masks are the main run's snapshots
        assert base == own
        assert ("mask_discovery" in cfg.arms) == preset.discovery
        assert cfg.mask_atol == 0.0 and cfg.adamw_lrs == preset.sweep_lrs
        assert cfg.sgd_lrs == cfg.sgd_momentum_lrs == preset.sgd_lrs
        no_masks = {"run.save_update_masks": False}  # only the main run keeps mask snapshots
        assert study.run_overrides(cfg, base, "rl", "opd") == {**no_masks, "method": "rl", "rollout.samples_per_prompt": 4}
        assert study.run_overrides(cfg, base, "sft", "opd") == {**no_masks, "method": "sft"}
        names = study.stage_names(cfg, "opd")
        assert names == ["opd", *[f"opd-seed{s}" for s in range(1, preset.seeds)], "sft", "rl"]


def test_real_default_preset_has_every_arm_and_grids_that_can_bracket_a_best():
    cfg = demo_real.real_study(DemoConfig(real=True, out="x"))
    base = study.main_config(cfg)
    assert base.method == "opsd" and base.optim.lr in cfg.adamw_lrs and len(cfg.adamw_lrs) >= 2
    assert len(cfg.sgd_lrs) >= 3 and len(cfg.sgd_momentum_lrs) >= 3 and cfg.mask_atol == 1e-5
    assert cfg.share_start_eval and cfg.prune and cfg.top_update_mask
    assert study.run_overrides(cfg, base, "sft", "opsd") == {
        "run.eval_start": False, "run.save_update_masks": False, "data.privileged_teacher": True, "method": "sft"}
    assert base.run.track_update_every == demo_real.TRACK_EVERY and base.run.save_update_masks
    plan = study.plan(cfg, base, "opsd", study.stage_names(cfg, "opsd"))
    trained = {"opsd", "opsd-seed1", "sft", "rl", "subnetwork", "mask-discovery", "optimizers"}
    assert trained <= set(plan) and "report" in plan and "analysis-opsd-fp32" in plan
    # eight optimizer arms (AdamW's main lr is the main run, in the middle of its grid), three masked arms
    assert sorted(cfg.adamw_lrs).index(base.optim.lr) == 1 and len(cfg.adamw_lrs) == 3
    assert plan["optimizers"] == ("experiment", base.run.steps * 8)
    assert plan["subnetwork"] == ("experiment", base.run.steps * 3)
    assert plan["mask-discovery"] == ("experiment", base.run.steps * 4)  # three early masks and the source's
    quick = demo_real.real_study(DemoConfig(real=True, preset="quick", out="x"))
    assert study.stage_names(quick, "opsd") == ["opsd"]


def test_main_config_refuses_a_student_without_a_teacher_for_opd():
    with pytest.raises(UserError, match="needs a teacher"):
        study.main_config(load_config(StudyConfig, None, {"student": "s", "method": "opd"}))
    with pytest.raises(UserError, match="opd or opsd"):
        study.main_config(load_config(StudyConfig, None, {"train.method": "sft"}))
    assert study.main_config(load_config(StudyConfig, None, {"student": "s", "method": "opsd"})).model.student == "s"
    with pytest.raises(UserError, match="arms"):
        load_config(StudyConfig, None, {"arms": ["sft", "lora"]})


def test_manifest_estimates_the_time_left_from_measured_rates(tmp_path):
    m = Manifest(tmp_path, "t", resume=False)
    m.plan({"a": ("run", 10.0), "b": ("experiment", 20.0), "c": ("analysis", 1.0)}, {"train": 5.0})
    assert m.time_left() is None  # no rate for analyses yet
    m.plan({"a": ("run", 10.0), "b": ("experiment", 20.0), "c": ("analysis", 1.0)}, {"train": 5.0, "analysis": 3.0})
    assert m.time_left() == pytest.approx(5.0 * 30 + 3.0)
    m._spent["train"] = [20.0, 10.0]  # a run of weight 10 took 20 s: 2 s per step from now on
    m.data["stages"] = [{"name": "a", "status": "done"}]
    assert m.time_left() == pytest.approx(2.0 * 20 + 3.0)
    assert "1/3 stages done" in m.progress()
    assert json.loads(json.dumps(m.data))  # the manifest stays plain JSON
