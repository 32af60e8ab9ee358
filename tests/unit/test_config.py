"""The config loader: defaults <- YAML <- overrides, and one-line errors for bad input."""

from __future__ import annotations

import pytest

from opdlab.config import AnalyzeConfig, DistillConfig, MaskConfig, load_config, to_yaml
from opdlab.errors import UserError


def test_defaults_yaml_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: sft\noptim:\n  lr: 2.0e-5\n  optimizer: sgd\nrun:\n  steps: 7\n")
    cfg = load_config(DistillConfig, path, {"optim.lr": 3e-4, "run.seed": None})
    assert cfg.method == "sft"  # from YAML
    assert cfg.optim.optimizer == "sgd"  # from YAML
    assert cfg.optim.lr == 3e-4  # override beats YAML
    assert cfg.run.steps == 7
    assert cfg.run.seed == 0  # None override leaves the default


def test_yaml_reads_scientific_notation_strings_as_floats(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-5\n")  # PyYAML reads this as a string
    assert load_config(DistillConfig, path).optim.lr == pytest.approx(1e-5)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(DistillConfig, None, {"loss.loss": "jsd", "loss.beta": 0.25, "optim.mask": "m.safetensors"})
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(DistillConfig, path) == cfg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("optim:\n  lrr: 1\n", "unknown field 'optim.lrr'"),
        ("bogus: 1\n", "unknown field 'bogus'"),
        ("optim:\n  lr: -1\n", "'optim.lr' must be positive"),
        ("loss:\n  beta: 1.5\n", "'loss.beta' must be in [0, 1]"),
        ("method: ppo\n", "'method' must be one of opd, opsd, sft, rl"),
        ("run:\n  steps: ten\n", "'run.steps' must be an integer"),
        ("run:\n  steps: 2.5\n", "'run.steps' must be an integer"),
        ("run:\n  tensorboard: 1\n", "'run.tensorboard' must be true or false"),
        ("optim: 3\n", "'optim' must be a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("optim: [\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_line_error_naming_file_and_field(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(DistillConfig, path)
    message = str(err.value)
    assert needle in message
    assert str(path) in message
    assert "\n" not in message


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(DistillConfig, tmp_path / "nope.yaml")


def test_rl_needs_a_group():
    with pytest.raises(UserError, match="samples_per_prompt"):
        load_config(DistillConfig, None, {"method": "rl", "rollout.samples_per_prompt": 1})


def test_list_fields_and_literals_of_tool_configs():
    cfg = load_config(MaskConfig, None, {"union": ["a", "b"], "dtype": "fp32"})
    assert cfg.union == ["a", "b"] and cfg.dtype == "fp32"
    with pytest.raises(UserError, match="'union' must be a list"):
        load_config(MaskConfig, None, {"union": "a"})
    with pytest.raises(UserError, match="'dtype' must be one of bf16, fp32"):
        load_config(AnalyzeConfig, None, {"dtype": "fp16"})
