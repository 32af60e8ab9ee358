"""The CLI only parses and dispatches: every command maps to a real recipe function."""

from __future__ import annotations

import argparse
import importlib
import inspect

import pytest

from opdlab import cli


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:  # argparse offers no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def test_command_table_matches_parser():
    assert _subcommands(cli.build_parser()) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_command_has_a_recipe_taking_a_config(command):
    module_name, func_name = cli.COMMANDS[command]
    func = getattr(importlib.import_module(module_name), func_name)
    params = list(inspect.signature(func).parameters.values())
    assert params, f"{module_name}.{func_name} must take a config"
    assert params[0].name in {"cfg", "config"}


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_works_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: opdlab" in capsys.readouterr().out


def test_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: -3\n")
    code = cli.main(["distill", "--config", str(bad), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "optim.lr" in err and str(bad) in err


def test_set_flag_parses_yaml_scalars():
    assert cli.parse_set(["rollout.temperature=0.7", "run.tensorboard=true", "model.student=x"]) == {
        "rollout.temperature": 0.7,
        "run.tensorboard": True,
        "model.student": "x",
    }
    with pytest.raises(cli.UserError, match="KEY=VALUE"):
        cli.parse_set(["novalue"])
