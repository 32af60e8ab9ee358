"""Loading configs: defaults <- YAML <- dotted overrides, with one-line errors (`opdlab.config` re-exports it).

`load_config` checks every key and type against the dataclass and raises a `UserError` naming
the file and field at fault; `parse_set` reads `--set KEY=VALUE` flags into
its overrides; `to_yaml` writes the resolved config saved into every run folder.

    cfg = load_config(DistillConfig, "run.yaml", {"optim.lr": 1e-5, "method": "sft"})
"""

from __future__ import annotations

import copy
import dataclasses
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from opdlab.errors import UserError

T = TypeVar("T")

# Field metadata for settings of how a command runs (resume, overwrite) rather than what it computes:
# `to_dict` and `to_yaml` leave them out, so a run's saved config.yaml never carries an `overwrite: true`
# into the next run that reads it.
NOT_SAVED: dict[str, Any] = {"saved": False}


def check(ok: bool, name: str, what: str) -> None:
    """Raise a one-line UserError for config field `name` when `ok` is false."""
    if not ok:
        raise UserError(f"config field '{name}' {what}")


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build `cls` from defaults, then the YAML file at `path`, then dotted `overrides`.

    Overrides whose value is None are ignored (an unset CLI flag). Unknown keys, wrong
    types and out-of-range values raise `UserError` naming the file and field.
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read config file ({exc})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise UserError(f"{path}: {where}not valid YAML; fix the syntax") from None
        check_size(loaded, str(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: top level must be a mapping of field: value")
        data = loaded
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[parts[-1]] = value
    return _build(cls, data, source, prefix="")


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set a.b=1` items -> {'a.b': 1}, values parsed as YAML scalars (the overrides `load_config` takes)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {show(item)}: expected KEY=VALUE, e.g. --set rollout.temperature=0.7")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {show(item)}: the value is not valid YAML; quote it, e.g. --set "
                            f"'{field_name(key)}=\"...\"'") from None
        check_size(out[key.strip()], f"--set {field_name(key)}")
    return out


def _build(cls: type[T], data: dict[str, Any], source: str, prefix: str) -> T:
    if not isinstance(data, dict):
        raise UserError(f"{source}: field '{prefix.rstrip('.')}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # cls is a dataclass
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be numbers or null too
    if unknown:
        known = ", ".join(sorted(fields))
        raise UserError(f"{source}: unknown field '{field_name(f'{prefix}{unknown[0]}')}'; known fields here: {known}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, source, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, source, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


def _coerce(value: Any, tp: Any, source: str, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = UserError(f"{source}: field '{name}' must be {_describe(tp)}, got {show(value)}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, source, name)
            except UserError:
                continue
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise UserError(f"{source}: field '{name}' must be one of {', '.join(map(str, args))}; got {show(value)}")
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, args[0], source, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int):
            if not INT_MIN <= value <= INT_MAX:  # torch seeds and counters are 64-bit
                raise UserError(f"{source}: field '{name}' must be an integer of at most 64 bits "
                                f"({INT_MIN} to {INT_MAX}), got {show(value)}")
            return value
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads "1e-5" as a string
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is Any:
        return value
    raise bad


# Integer fields (seeds, counts) fit what torch accepts as a seed: -2**63 .. 2**64 - 1.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
# A config expanding to more values than this (YAML aliases repeat a node without copying it) is refused
# before anything walks it: a few hundred bytes can otherwise expand to gigabytes.
MAX_VALUES = 100_000
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 3, 6, 6, 60, 60, 60


def show(value: Any) -> str:
    """A short one-line repr of a config value for messages (nested and long values abridged)."""
    return _SHOW.repr(value)


def field_name(name: Any) -> str:
    """A config key as a message shows it: on one line (newlines and other control characters escaped)."""
    text = str(name)
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def check_size(value: Any, source: str) -> None:
    """Refuse a loaded YAML value that expands to more than MAX_VALUES values, or refers to itself.

    Counted over the graph YAML builds (shared nodes once each, weighted by how often they are
    reached), so an alias bomb is measured without being expanded.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (list, dict)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise UserError(f"{source}: a YAML alias refers to a value that contains it; write the values out")
        active.add(key)
        children = list(node.values()) if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_VALUES:
                raise UserError(f"{source}: expands to more than {MAX_VALUES:,} values (YAML aliases repeat "
                                "nodes); write the values out or drop the aliases")
        active.discard(key)
        sizes[key] = total
        return total

    size(value)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None)) + " (or empty)"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML and JSON), without the fields marked NOT_SAVED."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("saved", True):
            value = getattr(cfg, f.name)
            out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (saved into every run folder)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
