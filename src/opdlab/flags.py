"""Command-line flags made from config fields: one source for each flag's name, type and help.

A flag's type, choices and default come from its field's type hint and default in config.py,
and its help is the string literal written under the field (an attribute docstring, as litgpt
documents its configs). `cli.py` only lists which fields each command exposes:

    parser = argparse.ArgumentParser()
    flags = add_flags(parser, DistillConfig, ["optim.lr", Flag("data.privileged_field", "--privileged")])
    overrides(parser.parse_args(["--lr", "1e-5"]), flags)  # {"optim.lr": 1e-5, "data.privileged_field": None}

Unset flags map to None, which `load_config` ignores, so a YAML file's value stands unless a
flag is given. The flag of `optim.lr` is `--lr`: the field's last name with `-` for `_`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Union


@dataclass(frozen=True)
class Flag:
    """One config field on the command line; whatever is not given here is derived from the field."""

    field: str  # dotted field path in the command's config, e.g. "optim.lr"
    name: str | None = None  # default: "--" + the path's last part with "-" for "_" ("--lr")
    positional: bool = False  # a positional argument (its metavar is the field name in capitals)
    nargs: str | int | None = None  # list fields default to "+"
    metavar: str | tuple[str, ...] | None = None
    required: bool = False
    shortcuts: tuple[str, ...] = ()  # choices that get a flag of their own: --quick is --preset quick

    @property
    def dest(self) -> str:
        """The attribute of the parsed arguments that holds this flag's value."""
        if self.positional:
            return self.field.rsplit(".", 1)[-1]
        return self.option.lstrip("-").replace("-", "_")

    @property
    def option(self) -> str:
        return self.name or "--" + self.field.rsplit(".", 1)[-1].replace("_", "-")


# ----------------------------------------------------------------------------- field documentation


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its attribute docstring, whitespace collapsed} for one dataclass (no inherited fields)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]  # the class definition
    docs: dict[str, str] = {}
    for stmt, following in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


@dataclass(frozen=True)
class FieldInfo:
    """A config field found by its dotted path."""

    path: str
    type: Any  # the resolved type hint
    default: Any
    help: str  # "" when the field has no docstring (tests/unit/test_flags.py fails on that)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def fields_of(cls: type, prefix: str = "") -> Iterator[FieldInfo]:
    """Every field of `cls`, nested config sections first as themselves, then their fields."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        info = FieldInfo(prefix + f.name, hints[f.name], _default(f), docs.get(f.name, ""))
        yield info
        if dataclasses.is_dataclass(info.type):
            yield from fields_of(info.type, f"{info.path}.")


def field_info(cls: type, path: str) -> FieldInfo:
    """The field at dotted `path` of `cls` (KeyError names the path when there is none)."""
    for info in fields_of(cls):
        if info.path == path:
            return info
    raise KeyError(f"{cls.__name__} has no field {path!r}")


# ----------------------------------------------------------------------------- argparse


def _plain(tp: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _argparse_kwargs(info: FieldInfo, flag: Flag) -> dict[str, Any]:
    tp = _plain(info.type)
    shown = not (info.default is None or info.default is False or info.default in ("", []))
    text = info.help.rstrip(".")
    if shown and not (flag.positional or flag.required):
        text += f" (default: {info.default})"
    kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}
    if tp is bool:
        return kwargs | {"action": "store_true", "default": None}
    if typing.get_origin(tp) is list:
        kwargs["nargs"] = flag.nargs or "+"
        tp = typing.get_args(tp)[0]
    elif flag.nargs is not None:
        kwargs["nargs"] = flag.nargs
    if typing.get_origin(tp) is Literal:
        kwargs["choices"] = list(typing.get_args(tp))
    elif tp in (int, float):
        kwargs["type"] = tp
    if flag.metavar:
        kwargs["metavar"] = flag.metavar
    if flag.positional:
        kwargs.setdefault("metavar", flag.dest.upper())
    else:
        kwargs |= {"default": None, "dest": flag.dest}
        if flag.required:
            kwargs["required"] = True
    return kwargs


def as_flags(specs: list[str | Flag]) -> list[Flag]:
    """Field paths -> Flags (a Flag stays as it is)."""
    return [s if isinstance(s, Flag) else Flag(s) for s in specs]


def add_flags(parser: argparse.ArgumentParser, cls: type, specs: list[str | Flag]) -> list[Flag]:
    """Add one argument per spec (a field path, or a Flag for anything not derived); returns the Flags."""
    flags = as_flags(specs)
    for flag in flags:
        kwargs = _argparse_kwargs(field_info(cls, flag.field), flag)
        if flag.positional:
            parser.add_argument(flag.dest, **kwargs)
            continue
        group = parser.add_mutually_exclusive_group() if flag.shortcuts else parser
        group.add_argument(flag.option, **kwargs)
        for value in flag.shortcuts:
            group.add_argument(f"--{value}", dest=flag.dest, action="store_const", const=value,
                               help=f"same as {flag.option} {value}")
    return flags


def overrides(args: argparse.Namespace, flags: list[Flag]) -> dict[str, Any]:
    """{field path: parsed value} for `load_config` (None = the flag was not given)."""
    return {flag.field: getattr(args, flag.dest) for flag in flags}
