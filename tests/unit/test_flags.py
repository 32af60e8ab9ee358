"""One source for each flag: config fields carry the help, cli.FLAGS only picks fields, the parser agrees."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import yaml

from opdlab import cli
from opdlab import config as C
from opdlab.flags import Flag, add_flags, as_flags, field_docs, field_info, fields_of, overrides

CONFIGS = sorted((obj for name, obj in vars(C).items() if name.endswith("Config") and dataclasses.is_dataclass(obj)),
                 key=lambda c: c.__name__)
NOT_FIELDS = {"help", "config", "set", "nproc"}  # how the config is read and how the process runs


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    for action in cli.build_parser()._actions:  # argparse offers no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _flags(command: str) -> list[Flag]:
    return as_flags(cli.FLAGS[command][2])


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_help_text(cls):
    missing = [f.path for f in fields_of(cls) if not f.help]
    assert not missing, f"{cls.__name__}: fields without a docstring under them: {missing}"


def test_every_config_class_belongs_to_a_command_or_a_section():
    used = {spec[0] for spec in cli.FLAGS.values()}
    nested = {f.type for cls in used for f in fields_of(cls) if dataclasses.is_dataclass(f.type)}
    assert set(CONFIGS) == used | nested
    assert set(cli.FLAGS) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(cli.FLAGS))
def test_every_flag_maps_to_a_field_and_carries_its_help(command):
    cls = cli.FLAGS[command][0]
    by_dest = {f.dest: f for f in _flags(command)}
    for action in _subparsers()[command]._actions:
        if action.dest in NOT_FIELDS:
            continue
        assert action.dest in by_dest, f"{command}: {action.option_strings or action.dest} names no config field"
        info = field_info(cls, by_dest[action.dest].field)
        if action.help.startswith("same as --"):  # a shortcut: --quick is --preset quick
            assert action.const in typing.get_args(info.type)
            continue
        assert action.help.startswith(info.help.rstrip(".").replace("%", "%%")), (command, action.dest)


@pytest.mark.parametrize("command", sorted(cli.FLAGS))
def test_every_plain_field_of_a_command_is_a_flag(command):
    """Nested sections (distill's model/data/..., experiment's train) are reached with --set or --config;
    every other field of a command's config is a flag."""
    cls = cli.FLAGS[command][0]
    plain = {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])}
    assert plain <= {f.field for f in _flags(command)}


def _value(info: Any, flag: Flag) -> tuple[list[str], Any]:
    """Command-line words that set the field to something other than its default, and that value."""
    tp = info.type
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        return [], True
    if typing.get_origin(tp) is Literal:
        choice = next(c for c in reversed(typing.get_args(tp)) if c != info.default)
        return [choice], choice
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        words = ["0.5", "0.25"] if item is float else (["sft"] if info.path in ("evidence_methods", "arms") else ["a.x", "b.x"])
        return words, [item(w) for w in words]
    if tp is int:
        return [str(info.default + 1)], info.default + 1
    if tp is float:
        return ["0.5"], 0.5
    return ["some-value"], "some-value"


def _argv(command: str, tested: Flag, words: list[str]) -> list[str]:
    """`COMMAND` with `tested` set to `words` and placeholder values for the required arguments."""
    cls = cli.FLAGS[command][0]
    flags = _flags(command)
    positionals = [f for f in flags if f.positional]
    before = positionals.index(tested) if tested in positionals else len(positionals)
    pos: list[str] = []
    options: list[str] = []
    for flag in flags:
        if flag == tested:
            given = words
        elif flag.required or (flag.positional and (flag.nargs is None or positionals.index(flag) < before)):
            tp = field_info(cls, flag.field).type
            given = [typing.get_args(tp)[0] if typing.get_origin(tp) is Literal else "given"]
        else:
            continue
        if flag.positional:
            pos += given
        else:
            options += [flag.option, *given]
    return [command, *pos, *options]


@pytest.mark.parametrize("command", sorted(cli.FLAGS))
def test_each_flag_sets_its_field(command, tmp_path):
    """One flag at a time: `opdlab COMMAND ... FLAG VALUE` builds a config whose field holds VALUE."""
    cls = cli.FLAGS[command][0]
    parser = cli.build_parser()
    for flag in _flags(command):
        words, expected = _value(field_info(cls, flag.field), flag)
        if command == "distill" and flag.field == "resume":  # must name a run folder
            (tmp_path / "config.yaml").write_text("method: sft\n")
            words, expected = [str(tmp_path)], str(tmp_path)
        argv = _argv(command, flag, words)
        assert _get(cli.to_config(parser.parse_args(argv)), flag.field) == expected, argv


def test_distill_flags_reach_nested_fields_and_unset_flags_keep_the_yaml(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("optim:\n  lr: 2.0e-5\nrun:\n  steps: 9\n")
    args = cli.build_parser().parse_args(["distill", "--config", str(cfg_file), "--steps", "7", "--privileged", "hint",
                                          "--set", "rollout.temperature=0.7"])
    cfg = cli.to_config(args)
    assert (cfg.run.steps, cfg.optim.lr, cfg.data.privileged_field, cfg.rollout.temperature) == (7, 2e-5, "hint", 0.7)
    assert cfg.overwrite is False and cfg.resume is None and cfg.model.trust_remote_code is False


def test_resume_reads_the_runs_own_config_and_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "sft", "out": "elsewhere", "run": {"steps": 5}}))
    cfg = cli.to_config(cli.build_parser().parse_args(["distill", "--resume", str(run), "--steps", "8"]))
    assert (cfg.method, cfg.out, cfg.resume, cfg.run.steps) == ("sft", str(run), str(run), 8)


def test_shortcuts_and_presets():
    parse = cli.build_parser().parse_args
    assert cli.to_config(parse(["demo", "--quick"])).preset == "quick"
    assert cli.to_config(parse(["demo", "--preset", "full"])).preset == "full"
    assert cli.to_config(parse(["demo"])).preset == "default"
    with pytest.raises(SystemExit):
        parse(["demo", "--quick", "--full"])
    from opdlab.recipes.experiment import PRESETS

    quick = cli.to_config(parse(["experiment", "optimizers", "--out", "x", "--preset", "quick"]))
    assert quick.preset == "quick" and quick.train.run.steps == PRESETS["quick"]["train.run.steps"]
    assert quick.sgd_lrs == PRESETS["quick"]["sgd_lrs"]
    mine = cli.to_config(parse(["experiment", "optimizers", "--out", "x", "--preset", "quick", "--sgd-lrs", "0.5"]))
    assert mine.sgd_lrs == [0.5]  # a flag beats the preset


def test_help_is_read_from_the_docstring_under_each_field():
    @dataclass
    class Planted:
        documented: int = 1
        """the first   field,
        over two lines."""
        bare: str = ""
        after_bare: float = 0.5
        """%-sign kept as one."""

    assert field_docs(Planted) == {"documented": "the first field, over two lines.", "after_bare": "%-sign kept as one."}
    assert [f.help for f in fields_of(Planted)] == ["the first field, over two lines.", "", "%-sign kept as one."]
    parser = argparse.ArgumentParser()
    flags = add_flags(parser, Planted, ["documented", Flag("after_bare", "--x")])
    assert overrides(parser.parse_args(["--x", "2"]), flags) == {"documented": None, "after_bare": 2.0}
    assert "%-sign kept as one (default: 0.5)" in parser.format_help()
    with pytest.raises(KeyError, match="nope"):
        field_info(Planted, "nope")


def test_saved_config_leaves_out_how_the_run_was_started(tmp_path):
    cfg = C.DistillConfig(resume="runs/a", overwrite=True)
    saved = yaml.safe_load(C.to_yaml(cfg))
    assert "resume" not in saved and "overwrite" not in saved and saved["optim"]["lr"] == cfg.optim.lr
    (tmp_path / "config.yaml").write_text(C.to_yaml(cfg))
    again = C.load_config(C.DistillConfig, tmp_path / "config.yaml")
    assert again.overwrite is False and again.resume is None


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_recipe_takes_only_a_config(command):
    module_name, func_name = cli.COMMANDS[command]
    func = getattr(importlib.import_module(module_name), func_name)
    params = list(inspect.signature(func).parameters.values())
    assert params[0].name == "cfg"
    assert all(p.default is not inspect.Parameter.empty for p in params[1:]), f"{func_name} needs more than cfg"
    assert not {p.name for p in params} & {"resume", "overwrite"}, "resume/overwrite belong in the config"
    assert "Path" in str(inspect.signature(func).return_annotation)

