"""Tensors and shard indexes the analysis cannot digest: one line naming the tensor or file, exit 2.

Through `opdlab.cli.main` (analyze, compare, mask): NaN / inf in either checkpoint, values that
overflow the analysis dtype, tensors with no elements, checkpoints without floating-point
tensors, and sharded indexes whose `weight_map` has the wrong type or encoding or points
outside the model folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli_error
from safetensors.torch import load_file, save_file

from opdlab.cli import main

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


def variant(root: Path, student: Path, name: str, change) -> Path:
    """A copy of the student whose weights went through `change(dict) -> dict`."""
    folder = root / name
    shutil.copytree(student, folder)
    weights = {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(change(weights), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _set(key: str, value: float, dtype: torch.dtype | None = None):
    def change(w):
        t = w[key].to(dtype) if dtype is not None else w[key]
        t.view(-1)[3] = value
        w[key] = t
        return w
    return change


@pytest.fixture(scope="module")
def bad(tmp_path_factory, pair) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_tensors")
    return {
        "nan": variant(root, pair[0], "nan", _set(Q, float("nan"))),
        "inf": variant(root, pair[0], "inf", _set(NORM, float("-inf"))),
        "f64_huge": variant(root, pair[0], "f64_huge", _set(Q, 1e300, torch.float64)),
        "f32_huge": variant(root, pair[0], "f32_huge", _set(Q, 3e38)),
        "empty": variant(root, pair[0], "empty", lambda w: {**w, "model.extra.weight": torch.zeros(4, 0)}),
        "ints": variant(root, pair[0], "ints", lambda w: {k: torch.ones(v.shape, dtype=torch.int32) for k, v in w.items()}),
    }


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_values_are_named(bad, pair, tmp_path, capsys, kind):
    key = Q if kind == "nan" else NORM
    weights = bad[kind] / "model.safetensors"
    for argv in (["analyze", str(pair[0]), str(bad[kind]), "--out", str(tmp_path / "a")],
                 ["analyze", str(bad[kind]), str(pair[0]), "--out", str(tmp_path / "a2"), "--dtype", "fp32"],
                 ["mask", str(pair[0]), str(bad[kind]), "--out", str(tmp_path / "m.safetensors")],
                 ["compare", str(pair[0]), str(pair[0]), str(bad[kind]), "--out", str(tmp_path / "c")]):
        line = cli_error(argv, capsys)
        assert key in line and str(weights) in line and "1 NaN or infinite value" in line, line
    assert not (tmp_path / "m.safetensors").exists()


def test_values_that_overflow_the_analysis_dtype(bad, pair, tmp_path, capsys):
    line = cli_error(["analyze", str(pair[0]), str(bad["f64_huge"]), "--out", str(tmp_path / "a")], capsys)
    assert Q in line and "1e+300" in line and "bf16" in line, line
    line = cli_error(["analyze", str(pair[0]), str(bad["f64_huge"]), "--out", str(tmp_path / "b"), "--dtype", "fp32"], capsys)
    assert Q in line and "fp32" in line, line
    # 3e38 fits fp32 and bf16, but its square and the differences overflow the analysis' fp32 arithmetic.
    line = cli_error(["analyze", str(pair[0]), str(bad["f32_huge"]), "--out", str(tmp_path / "c")], capsys)
    assert Q in line and "too large" in line, line
    line = cli_error(["mask", str(pair[0]), str(bad["f64_huge"]), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert Q in line and "bf16" in line, line


def test_tensors_without_elements_are_skipped_and_listed(bad, tmp_path, capsys):
    out = tmp_path / "a"
    capsys.readouterr()
    assert main(["analyze", str(bad["empty"]), str(bad["empty"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model.extra.weight (no elements)" in err
    doc = json.loads((out / "analysis.json").read_text())
    assert "model.extra.weight (no elements)" in doc["skipped"] and doc["summary"]["num_tensors"] > 0
    assert main(["mask", str(bad["empty"]), str(bad["empty"]), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(["compare", str(bad["empty"]), str(bad["empty"]), str(bad["empty"]), "--out", str(tmp_path / "c")]) == 0


def test_checkpoints_without_floating_point_tensors(bad, tmp_path, capsys):
    ints = str(bad["ints"])
    for argv in (["analyze", ints, ints, "--out", str(tmp_path / "a")],
                 ["mask", ints, ints, "--out", str(tmp_path / "m.safetensors")],
                 ["compare", ints, ints, ints, "--out", str(tmp_path / "c")]):
        line = cli_error(argv, capsys)
        assert "no floating-point tensors" in line and ints in line, line
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- sharded indexes


def sharded(root: Path, student: Path, name: str, weight_map) -> Path:
    """The student split into two shards, with `weight_map` (None: the correct one) in its index."""
    folder = root / name
    shutil.copytree(student, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(weights)
    save_file({k: weights[k] for k in keys[:5]}, str(folder / "a.safetensors"), metadata={"format": "pt"})
    save_file({k: weights[k] for k in keys[5:]}, str(folder / "b.safetensors"), metadata={"format": "pt"})
    good = {k: ("a.safetensors" if i < 5 else "b.safetensors") for i, k in enumerate(keys)}
    index = {"metadata": {}, "weight_map": good if weight_map is None else weight_map(good)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory, pair) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    outside = root / "outside.safetensors"
    save_file({"x": torch.zeros(2)}, str(outside))
    folders = {
        "list": sharded(root, pair[0], "list", lambda g: sorted(g.values())),
        "number": sharded(root, pair[0], "number", lambda g: {**g, Q: 7}),
        "dotdot": sharded(root, pair[0], "dotdot", lambda g: {**g, Q: "../outside.safetensors"}),
        "absolute": sharded(root, pair[0], "absolute", lambda g: {**g, Q: str(outside)}),
        "latin1": sharded(root, pair[0], "latin1", None),
    }
    index = folders["latin1"] / "model.safetensors.index.json"
    index.write_bytes(index.read_bytes().replace(b'"metadata": {}', '"metadata": {"n": "caf\u00e9"}'.encode("latin-1")))
    return folders


@pytest.mark.parametrize("kind", ["list", "number", "dotdot", "absolute", "latin1"])
def test_bad_shard_indexes(shards, pair, tmp_path, capsys, kind):
    index = shards[kind] / "model.safetensors.index.json"
    for argv in (["analyze", str(pair[0]), str(shards[kind]), "--out", str(tmp_path / "a")],
                 ["mask", str(shards[kind]), str(pair[0]), "--out", str(tmp_path / "m.safetensors")],
                 ["distill", "--student", str(shards[kind]), "--teacher", str(pair[1]), "--task", "addition",
                  "--steps", "1", "--out", str(tmp_path / "run")]):
        line = cli_error(argv, capsys)
        assert str(index) in line, line
        if kind in ("dotdot", "absolute"):
            assert "outside the model folder" in line, line
    assert not (tmp_path / "a").exists()  # analyze checks its inputs before --out is made
