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
from opdlab.errors import UserError, environment_error

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
}


def _recipe(command: str) -> Callable[..., Any]:
    module, func = COMMANDS[command]
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opdlab",
        description="On-policy distillation, and what it does to a model's parameters.",
    )
    parser.add_argument("--version", action="version", version=f"opdlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="the whole study on the built-in tiny pair, offline, on CPU")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick", help="a first look (about 3 min)")
    g.add_argument("--full", dest="preset", action="store_const", const="full", help="longer, more faithful run")
    p.add_argument("--out", default=None, help="demo folder (default: opdlab-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty demo folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo, skipping finished stages")
    p.add_argument("--vlm", action="store_true", default=None, help="run the study on the built-in vision-language pair")
    p.add_argument("--real", action="store_true", default=None,
                   help="self-distill a real pretrained model, SmolLM2-135M-Instruct (needs opdlab[real]; ~13 min)")

    p = sub.add_parser("distill", help="train: method opd | opsd | sft | rl")
    p.add_argument("--config", default=None, help="YAML config file (flags override it)")
    p.add_argument("--method", choices=["opd", "opsd", "sft", "rl"], default=None)
    p.add_argument("--loss", default=None, help="reverse_kl | forward_kl | jsd | topk_reverse_kl | sampled | k2 | k3")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--mask", default=None, help="subnetwork mask (.safetensors): train only these coordinates")
    p.add_argument("--student", default=None,
                   help="student: HF model folder, .gguf file, opdlab run folder or smollm2-135m-instruct (default: the built-in pair)")
    p.add_argument("--teacher", default=None,
                   help="teacher, same forms as --student (default: the built-in pair; for opsd the student's source)")
    p.add_argument("--privileged", default=None, metavar="FIELD",
                   help="opsd: prompts-file field with the teacher's privileged context (default: privileged, else the answer)")
    p.add_argument("--pair", default=None, help="built-in pair when no --student/--teacher (see `opdlab zoo list`)")
    p.add_argument("--prompts", default=None, help="prompts file (.jsonl / .parquet) or datasets folder")
    p.add_argument("--task", default=None, help="built-in task for generated prompts and accuracy")
    p.add_argument("--save-dtype", choices=["bf16", "fp32", "both"], default=None, help="checkpoint storage dtype")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="torch device (cpu, cuda)")
    p.add_argument("--out", default=None, help="run folder")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty run folder")
    p.add_argument("--trust-remote-code", action="store_true", default=None, help="allow model code from checkpoints to run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, e.g. --set rollout.temperature=0.7")
    p.add_argument("--nproc", type=int, default=None, metavar="N", help="train on N local processes (re-launches under torchrun, FSDP2)")

    for name, help_text, positionals in (
        ("analyze", "how TUNED differs from BASE", ["base", "tuned"]),
        ("compare", "overlap of two runs' update masks against chance", ["base", "run_a", "run_b"]),
    ):
        p = sub.add_parser(name, help=help_text)
        for pos in positionals:
            p.add_argument(pos, metavar=pos.upper())
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="analysis dtype (default bf16)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--skip-mismatched", action="store_true", help="skip and list tensors that do not match")
        p.add_argument("--overwrite", action="store_true")
        if name == "compare":
            p.add_argument("--atol", type=float, default=0.0, help="changed when |delta| > atol (default 0)")
        else:
            p.add_argument("--workers", type=int, default=0, help="threads for per-tensor work (0 = automatic)")

    p = sub.add_parser("mask", help="extract, randomize, combine or measure subnetwork masks")
    p.add_argument("base", nargs="?", metavar="BASE")
    p.add_argument("tuned", nargs="?", metavar="TUNED")
    p.add_argument("--out", required=True, help="output .safetensors (or .json with --overlap)")
    p.add_argument("--atol", type=float, default=0.0)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--random-like", default=None, metavar="MASK", help="random control with the same per-tensor density")
    p.add_argument("--union", nargs="+", default=[], metavar="MASK")
    p.add_argument("--intersect", nargs="+", default=[], metavar="MASK")
    p.add_argument("--overlap", nargs=2, default=[], metavar="MASK")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("delta", help="a run as the coordinates it changed (exact, sparse), or TUNED rebuilt from one")
    p.add_argument("base", nargs="?", metavar="BASE")
    p.add_argument("tuned", nargs="?", metavar="TUNED")
    p.add_argument("--apply", nargs=2, default=[], metavar=("BASE", "DELTA"), help="rebuild TUNED from BASE and a delta file")
    p.add_argument("--out", required=True, help="delta .safetensors file, or with --apply the model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file or folder")

    p = sub.add_parser("report", help="one self-contained report.html from files on disk")
    p.add_argument("path", metavar="DIR", help="demo, run, analysis or experiment folder")
    p.add_argument("--out", default=None, help="where report.html goes (default: inside DIR)")

    p = sub.add_parser("zoo", help="the built-in tiny teacher/student pairs and the shipped real model")
    p.add_argument("action", choices=["list", "build"])
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--rebuild", action="store_true", help="retrain from the seed even if cached")

    p = sub.add_parser("experiment", help="the subnetwork-retraining and optimizer experiments")
    p.add_argument("kind", choices=["subnetwork", "optimizers"])
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--out", required=True, help="experiment folder")
    p.add_argument("--preset", choices=["quick", "default", "full"], default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="skip stages already finished in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set a.b=1` items -> {'a.b': 1}, values parsed as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set rollout.temperature=0.7")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML; quote it, e.g. --set '{key}=\"...\"'") from None
    return out


def to_config(args: argparse.Namespace) -> Any:
    """Turn parsed arguments into the command's config object."""
    from opdlab import config as C

    cmd = args.command
    if cmd == "demo":
        return C.load_config(C.DemoConfig, None, {"preset": args.preset, "out": args.out,
                                                  "overwrite": args.overwrite, "resume": args.resume,
                                                  "vlm": args.vlm, "real": args.real})
    if cmd == "distill":
        overrides = {
            "method": args.method, "loss.loss": args.loss, "optim.optimizer": args.optimizer, "optim.lr": args.lr,
            "run.steps": args.steps, "optim.mask": args.mask, "model.student": args.student,
            "model.teacher": args.teacher, "data.prompts": args.prompts, "data.task": args.task,
            "run.save_dtype": args.save_dtype, "run.seed": args.seed, "model.device": args.device, "out": args.out,
            "model.trust_remote_code": args.trust_remote_code, "model.pair": args.pair,
            "data.privileged_field": args.privileged,
        }
        overrides.update(parse_set(args.set))
        config_file = args.config
        if args.resume and config_file is None:
            config_file = str(Path(args.resume) / "config.yaml")
            if not Path(config_file).is_file():
                raise UserError(f"--resume {args.resume}: not an opdlab run folder (no config.yaml)")
            if args.out is None:
                overrides["out"] = args.resume
        return C.load_config(C.DistillConfig, config_file, overrides)
    if cmd == "analyze":
        return C.load_config(C.AnalyzeConfig, None, {
            "base": args.base, "tuned": args.tuned, "out": args.out, "dtype": args.dtype, "device": args.device,
            "skip_mismatched": args.skip_mismatched, "workers": args.workers, "overwrite": args.overwrite})
    if cmd == "compare":
        return C.load_config(C.CompareConfig, None, {
            "base": args.base, "run_a": args.run_a, "run_b": args.run_b, "out": args.out, "dtype": args.dtype,
            "atol": args.atol, "device": args.device, "skip_mismatched": args.skip_mismatched,
            "overwrite": args.overwrite})
    if cmd == "mask":
        return C.load_config(C.MaskConfig, None, {
            "base": args.base, "tuned": args.tuned, "out": args.out, "atol": args.atol, "dtype": args.dtype,
            "device": args.device, "random_like": args.random_like, "union": args.union,
            "intersect": args.intersect, "overlap": args.overlap, "seed": args.seed, "overwrite": args.overwrite})
    if cmd == "delta":
        return C.load_config(C.DeltaConfig, None, {"base": args.base, "tuned": args.tuned, "apply": args.apply,
                                                   "out": args.out, "overwrite": args.overwrite})
    if cmd == "report":
        return C.load_config(C.ReportConfig, None, {"path": args.path, "out": args.out})
    if cmd == "zoo":
        return C.load_config(C.ZooConfig, None, {"action": args.action, "name": args.name, "rebuild": args.rebuild})
    if cmd == "experiment":
        from opdlab.recipes.experiment import experiment_config

        return experiment_config(args)
    raise AssertionError(f"unhandled command {cmd}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "distill" and args.nproc is not None and args.nproc > 1:
            from opdlab.dist.launch import relaunch

            return relaunch(sys.argv[1:] if argv is None else list(argv), args.nproc)
        cfg = to_config(args)
        extra: dict[str, Any] = {}
        if args.command == "distill":
            extra = {"resume": args.resume, "overwrite": args.overwrite}
        result = _recipe(args.command)(cfg, **extra)
    except UserError as exc:
        if args.debug:
            raise
        print(f"opdlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a forbidden folder is one line too; other OSErrors are bugs
        if args.debug or environment_error(exc) is None:
            raise
        print(f"opdlab {args.command}: error: {environment_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # guards.Interrupted says where the checkpoint is and how to resume
        print(f"opdlab {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    if result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
