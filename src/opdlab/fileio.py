"""Atomic writes: a reader (or a crash) never sees a half-written file or folder.

Every file opdlab writes goes to a temporary name in the same folder, is flushed and
fsynced, and is then renamed over the target (rename is atomic on POSIX filesystems).
Folders are written the same way: fill `NAME.tmp-<pid>`, then rename to `NAME`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from opdlab.errors import UserError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it over `target`.

    Works for a file or a folder written at the yielded path. On an exception the
    temporary is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp_item = tmp / target.name
    try:
        yield tmp_item
        if tmp_item.is_file():
            with open(tmp_item, "rb") as fh:
                os.fsync(fh.fileno())
        elif tmp_item.is_dir():
            for f in tmp_item.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        else:
            raise RuntimeError(f"atomic_path: nothing was written at {tmp_item}")
        if target.is_dir() and not target.is_symlink():
            # Rename the old folder aside first, so the swap never leaves a mix of both.
            old = tmp / (target.name + ".old")
            os.replace(target, old)
            os.replace(tmp_item, target)
        else:
            os.replace(tmp_item, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what killed writers left in `folder`: hidden `.NAME.tmp-*` entries; return them.

    Only safe while no other process writes into `folder` (opdlab calls it when a run resumes).
    """
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and ".tmp-" in p.name] if folder.is_dir() else []
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    return stale


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically (NaN/inf become null)."""
    return write_text(path, json.dumps(_finite(obj), indent=2, sort_keys=False) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most this line)."""
    line = json.dumps(_finite(record)) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike, fix: str = "restore the file or delete that line") -> list[dict[str, Any]]:
    """Read a JSON-lines file, ignoring a torn last line left by a crash.

    Any other line that is not UTF-8, not JSON or not an object is a UserError naming the file
    and its line number (counted from 1), followed by `fix`.
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if i == len(lines) - 1:
                break  # torn final line from an interrupted append
            what = f"not UTF-8 text (byte {exc.start})" if isinstance(exc, UnicodeDecodeError) else f"not valid JSON ({exc.msg})"
            raise UserError(f"{path}: line {i + 1}: {what}; {fix}") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {i + 1}: not a JSON object; {fix}")
        rows.append(row)
    return rows


def read_json(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a UserError naming the file (and the line) when it is not UTF-8,
    not JSON or not an object, followed by `fix` (what the user can do)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); {fix}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: must hold a JSON object, not a {type(obj).__name__}; {fix}")
    return obj


OUTPUT_MARKER = ".opdlab-output"  # written into every folder opdlab creates for --out


def _read_folder(path: Path) -> Path:
    """The folder (or file) a command actually reads for an input: an opdlab run folder is read
    through its final checkpoint, so `--out RUN/analysis` does not touch what it reads."""
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "final").is_dir():
        return path / "final"
    return path


def refuse_out_over_inputs(out: str | os.PathLike, inputs: dict[str, Any]) -> None:
    """UserError when `out` is, holds, or lies inside one of `inputs` ({label: path, list of paths or None}).

    Replacing or filling such an --out would delete or change an input before (or while) it is
    read. An opdlab run folder counts as its `final/` checkpoint, so `--out RUN/analysis` stays
    allowed while `--out RUN`, `--out RUN/final` and a folder holding RUN are refused. Inputs that
    are not paths on disk (a shipped model's name) are skipped.
    """
    target = Path(out).resolve()
    for label, given in inputs.items():
        for item in given if isinstance(given, (list, tuple)) else [given]:
            if item is None or item == "" or not Path(item).exists():
                continue
            shown = _read_folder(Path(item))
            read = shown.resolve()
            if target == read:
                how = "is"
            elif target in read.parents:
                how = "holds"
            elif read in target.parents:
                how = "lies inside"
            else:
                continue
            raise UserError(f"--out {out} {how} {shown}, an input ({label}); writing there would change or delete "
                            "it before it is read; choose an --out outside the inputs")


def _marked(folder: Path) -> bool:
    return (folder / OUTPUT_MARKER).is_file()


def _mark(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / OUTPUT_MARKER).write_text("written by opdlab; --overwrite may replace this folder\n")
    except OSError as exc:
        raise UserError(f"{folder}: cannot write there ({exc.strerror}); choose another --out") from None


def check_out_dir(out: str | os.PathLike, overwrite: bool, inputs: dict[str, Any] | None = None) -> bool:
    """Refuse `out` as an output folder unless it is new, empty, or (with `overwrite`) one opdlab wrote.

    Returns True when `out` holds earlier output that `overwrite` allows replacing. `--overwrite`
    only ever replaces a folder opdlab made itself (it holds `OUTPUT_MARKER`), so a mistyped
    `--out ~ --overwrite` cannot delete a user's files; it never follows a symbolic link, and
    `inputs` (see `refuse_out_over_inputs`) are never inside what it replaces.
    """
    out = Path(out)
    refuse_out_over_inputs(out, inputs or {})
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(p.name != OUTPUT_MARKER for p in out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: folder exists and is not empty; pass --overwrite or choose another --out")
        if out.is_symlink():
            raise UserError(f"{out}: is a symbolic link (to {os.path.realpath(out)}); --overwrite does not replace "
                            "what a link points to; pass the folder itself or another --out")
        if not _marked(out):
            raise UserError(f"{out}: --overwrite only replaces folders opdlab wrote, and this one holds other files; "
                            "remove it yourself or choose another --out")
        return True
    return False


def prepare_out_dir(out: str | os.PathLike, overwrite: bool, inputs: dict[str, Any] | None = None) -> Path:
    """Create the output folder as `check_out_dir` allows (replacing earlier output with `overwrite`)."""
    out = Path(out)
    if check_out_dir(out, overwrite, inputs):
        shutil.rmtree(out)
    _mark(out)
    return out


def prepare_own_dir(out: str | os.PathLike, inputs: dict[str, Any] | None = None) -> Path:
    """A folder opdlab may write its files into without `--overwrite` (the report's): new, empty, or
    made by opdlab (it holds `OUTPUT_MARKER`). A folder holding other files is refused, so a user's
    own `figures/` or `report.html` there is never replaced."""
    out = Path(out)
    refuse_out_over_inputs(out, inputs or {})
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and not _marked(out) and any(out.iterdir()):
        raise UserError(f"{out}: the folder holds files opdlab did not write; choose a new or empty --out "
                        "(nothing in it was changed)")
    _mark(out)
    return out


# ----------------------------------------------------------------------------- paths inside result files


def relative_path(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """`path` as a result file in `folder` records it: relative to `folder` (POSIX separators) when it
    names something on disk, so a results folder can move as a whole; unchanged otherwise (a model name)."""
    p = Path(path)
    if not p.exists():
        return str(path)
    try:
        return Path(os.path.relpath(p.resolve(), Path(folder).resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return str(p.resolve())


def resolve_path(recorded: str, folder: str | os.PathLike) -> Path:
    """A path read from a result file in `folder` (the inverse of `relative_path`)."""
    p = Path(recorded)
    return p if p.is_absolute() else Path(folder).resolve() / p  # resolved, as `relative_path` measured it


# ----------------------------------------------------------------------------- reading model folders

SHARD_INDEX = "model.safetensors.index.json"


def shard_files(folder: str | os.PathLike) -> list[Path] | None:
    """The shard files a model folder's `model.safetensors.index.json` lists (None: no index).

    A UserError names the index when it is not UTF-8 JSON with a `weight_map` object of
    {tensor: file name} strings, when a shard path leaves the model folder (`..`, an absolute
    path, a link pointing elsewhere), or when a listed shard is missing.
    """
    folder = Path(folder)
    index = folder / SHARD_INDEX
    if not index.is_file():
        return None
    fix = "re-download or re-save the model"
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except UnicodeDecodeError as exc:
        raise UserError(f"{index}: not UTF-8 text (byte {exc.start}); {fix}") from None
    except (json.JSONDecodeError, AttributeError, OSError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                   for k, v in weight_map.items()):
        raise UserError(f"{index}: not a valid safetensors index (needs a 'weight_map' object of "
                        f"{{tensor name: shard file name}} strings); {fix}")
    root = folder.resolve()
    files = []
    for name in sorted(set(weight_map.values())):
        shard = folder / name
        if Path(name).is_absolute() or root not in shard.resolve().parents:
            raise UserError(f"{index}: shard {name!r} lies outside the model folder; opdlab reads only shards "
                            f"inside {folder}; {fix}")
        if not shard.is_file():
            raise UserError(f"{index}: shard {name} is listed but missing; {fix}")
        files.append(shard)
    return files


def save_safetensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` as one safetensors file, atomically; a full disk or a forbidden folder is a
    UserError naming `path`, and nothing half-written is left (neither `path` nor a temporary)."""
    # safetensors.torch imports torch: loaded here, where tensors are written, not with every command.
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "I/O error" not in text:
            raise
        raise UserError(f"{path}: could not write it ({text.split('I/O error: ')[-1]}; {free_space(path.parent)}); "
                        "free disk space or fix the folder's permissions, then run again") from None
    return path


def free_space(folder: str | os.PathLike) -> str:
    """'12.3 MiB free there' for the filesystem of `folder` (for disk-full messages)."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"
