"""The `opdlab` command line: it only parses arguments and dispatches to a recipe.

Each subcommand builds one config object (defaults <- YAML <- flags) and calls one
recipe function, which returns where its results are; the CLI prints that path.
User errors (`UserError`) print one line on stderr and exit with code 2; `--debug`
shows the traceback instead.

    opdlab demo --quick
    opdlab distill --method opd --steps 100 --out runs/opd
    opdlab analyze SOURCE runs/opd --out runs/opd/analysis
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Callable

from opdlab import __version__
from opdlab import config as C
from opdlab.config_loading import parse_set
from opdlab.dist.launch import relaunch
from opdlab.errors import UserError, environment_error
from opdlab.flags import Flag, add_flags, as_flags, overrides

# command -> (module, function). tests/unit/test_cli.py keeps this in sync with the parser.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("opdlab.recipes.demo", "demo"),
    "distill": ("opdlab.recipes.distill", "distill"),
    "analyze": ("opdlab.recipes.analyze", "analyze"),
    "compare": ("opdlab.recipes.compare", "compare"),
    "mask": ("opdlab.recipes.mask", "mask"),
    "delta": ("opdlab.recipes.delta", "delta"),
    "report": ("opdlab.recipes.report", "report"),
    "zoo": ("opdlab.recipes.zoo", "zoo"),
    "experiment": ("opdlab.recipes.experiment", "experiment"),
    "study": ("opdlab.recipes.study", "study"),
}


def _recipe(command: str) -> Callable[..., Any]:
    module, func = COMMANDS[command]
    return getattr(importlib.import_module(module), func)


# Which config fields each command exposes as flags. Name, type, choices, default and help of each
# flag come from the field (opdlab/flags.py); a string is a field path whose flag is its last part
# ("optim.lr" -> --lr), a Flag says what is not derived. Every field not listed is reachable with
# --set (distill, experiment). tests/unit/test_flags.py keeps these lists, the parser and config.py
# in sync.
FLAGS: dict[str, tuple[type, str, list[str | Flag]]] = {
    "demo": (C.DemoConfig, "the whole study on the built-in tiny pair, offline, on CPU", [
        Flag("preset", shortcuts=("quick", "full")), "out", "overwrite", "resume", "vlm", "real"]),
    "distill": (C.DistillConfig, "train: method opd | opsd | sft | rl", [
        "method", "loss.loss", "optim.optimizer", "optim.lr", "run.steps", "optim.mask", "model.student",
        "model.teacher", Flag("data.privileged_field", "--privileged", metavar="FIELD"), "model.pair",
        "data.prompts", "data.task", "run.save_dtype", "run.precision", "run.seed", "model.device", "out",
        Flag("resume", metavar="RUN_DIR"), "overwrite", "model.trust_remote_code"]),
    "analyze": (C.AnalyzeConfig, "how TUNED differs from BASE", [
        Flag("base", positional=True), Flag("tuned", positional=True), Flag("out", required=True), "dtype",
        "device", "skip_mismatched", "overwrite", "workers", "exact_svd_max"]),
    "compare": (C.CompareConfig, "overlap of two runs' update masks against chance", [
        Flag("base", positional=True), Flag("run_a", positional=True), Flag("run_b", positional=True),
        Flag("out", required=True), "dtype", "device", "skip_mismatched", "overwrite", "atol"]),
    "mask": (C.MaskConfig, "extract, randomize, combine or measure subnetwork masks", [
        Flag("base", positional=True, nargs="?"), Flag("tuned", positional=True, nargs="?"),
        Flag("out", required=True), "atol", "dtype", "device", Flag("random_like", metavar="MASK"),
        Flag("top_like", metavar="MASK"), Flag("union", metavar="MASK"), Flag("intersect", metavar="MASK"), Flag("overlap", nargs=2, metavar="MASK"),
        "seed", "overwrite"]),
    "delta": (C.DeltaConfig, "a run as the coordinates it changed (exact, sparse), or TUNED rebuilt from one", [
        Flag("base", positional=True, nargs="?"), Flag("tuned", positional=True, nargs="?"),
        Flag("apply", nargs=2, metavar=("BASE", "DELTA")), Flag("out", required=True), "overwrite"]),
    "report": (C.ReportConfig, "one self-contained report.html from files on disk", [
        Flag("path", positional=True, metavar="DIR"), "out"]),
    "zoo": (C.ZooConfig, "the built-in tiny teacher/student pairs and the shipped real model", [
        Flag("action", positional=True), Flag("name", positional=True, nargs="?"), "rebuild"]),
    "experiment": (C.ExperimentConfig, "the subnetwork-retraining, mask-discovery and optimizer experiments", [
        Flag("kind", positional=True), Flag("out", required=True), "preset", "overwrite", "resume", "mask_atol",
        "mask_dtype", "top_update_mask", Flag("discovery_fractions", metavar="F"), "discovery_every",
        Flag("adamw_lrs", metavar="LR"), Flag("sgd_lrs", metavar="LR"),
        Flag("sgd_momentum_lrs", metavar="LR"), "sgd_momentum", Flag("evidence_methods", metavar="METHOD")]),
    "study": (C.StudyConfig, "the whole study on one pair: main run, baselines, subnetworks, optimizers, report", [
        "student", "teacher", "prompts", "task", "method", Flag("out", required=True),
        Flag("preset", shortcuts=("quick", "full")), "overwrite", "resume", Flag("arms", metavar="PART"), "seeds",
        "rl_samples_per_prompt", "mask_atol", "mask_dtype", "top_update_mask", Flag("discovery_fractions", metavar="F"),
        "track_update_every", Flag("adamw_lrs", metavar="LR"), Flag("sgd_lrs", metavar="LR"),
        Flag("sgd_momentum_lrs", metavar="LR"), "sgd_momentum", "share_start_eval", "prune"]),
}
# Flags that are not config fields: how the config is read, and how the process runs.
CONFIG_FILE_COMMANDS = ("distill", "experiment", "study")  # --config FILE and --set KEY=VALUE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opdlab",
        description="On-policy distillation, and what it does to a model's parameters.",
    )
    parser.add_argument("--version", action="version", version=f"opdlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command, (cls, summary, specs) in FLAGS.items():
        p = sub.add_parser(command, help=summary, description=summary)
        if command in CONFIG_FILE_COMMANDS:
            p.add_argument("--config", default=None, metavar="FILE", help="YAML config file (flags override it)")
        add_flags(p, cls, specs)
        if command in CONFIG_FILE_COMMANDS:
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="any config field, e.g. --set "
                           + ("rollout.temperature=0.7" if command == "distill" else "train.run.steps=50"))
        if command == "distill":
            p.add_argument("--nproc", type=int, default=None, metavar="N",
                           help="train on N local processes (re-launches under torchrun, FSDP2)")
    return parser


def to_config(args: argparse.Namespace) -> Any:
    """Turn parsed arguments into the command's config object (defaults <- --config <- flags <- --set)."""
    cls, _, specs = FLAGS[args.command]
    values = overrides(args, as_flags(specs))
    values.update(parse_set(getattr(args, "set", [])))
    config_file = getattr(args, "config", None)
    if args.command == "distill" and args.resume and config_file is None:
        from opdlab.recipes.distill import run_config_file  # recipes load on use: `--help` stays quick

        config_file = str(run_config_file(Path(args.resume)))  # the run's own config; flags still override it
        if args.out is None:
            values["out"] = args.resume
    if args.command == "experiment" and args.preset:
        from opdlab.recipes.experiment import PRESETS  # recipes load on use: `--help` stays quick

        values = PRESETS[args.preset] | {k: v for k, v in values.items() if v is not None}
    if args.command == "study":
        return _study_config(values, config_file)
    return C.load_config(cls, config_file, values)


def _study_config(values: dict[str, Any], config_file: str | None) -> Any:
    """StudyConfig from its preset, then the --config file, then flags and --set (the preset is the base)."""
    from opdlab.recipes.study import PRESETS as STUDY_PRESETS  # recipes load on use: `--help` stays quick

    given = {k: v for k, v in values.items() if v is not None}
    from_file: dict[str, Any] = {}
    if config_file is not None:
        checked = C.load_config(C.StudyConfig, config_file, given)  # a bad field is one line naming the file
        from_file = _flatten(C.to_dict(C.load_config(C.StudyConfig, config_file)), C.to_dict(C.StudyConfig()))
        given.setdefault("preset", checked.preset)
    return C.load_config(C.StudyConfig, None, STUDY_PRESETS[given.get("preset", "default")] | from_file | given)


def _flatten(d: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the values in `d` that differ from `defaults` (what a config file set)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, defaults.get(k) or {}, f"{prefix}{k}."))
        elif v != defaults.get(k):
            out[f"{prefix}{k}"] = v
    return out


def one_line(message: str) -> str:
    """An error message as exactly one line: line breaks inside it (from a file name, a config key or a
    library's message) are shown escaped, so no input can end the line early or forge a second one."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "distill" and args.nproc is not None and args.nproc > 1:
            return relaunch(sys.argv[1:] if argv is None else list(argv), args.nproc)
        result = _recipe(args.command)(to_config(args))
    except UserError as exc:
        if args.debug:
            raise
        print(f"opdlab {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a forbidden folder is one line too; other OSErrors are bugs
        if args.debug or environment_error(exc) is None:
            raise
        print(f"opdlab {args.command}: error: {one_line(str(environment_error(exc)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # guards.Interrupted says where the checkpoint is and how to resume
        print(f"opdlab {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    if result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
