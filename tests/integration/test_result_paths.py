"""Result files record what the report needs: analysis.json the method of the run it analysed, and
every path relative to the file, so a results folder can move (or be read from another working
folder) and `opdlab report` still finds the runs behind it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from opdlab.cli import main
from opdlab.fileio import relative_path, resolve_path
from opdlab.report import discover as D


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
            "model.norm.weight": torch.ones(8)}


def _run_folder(folder: Path, method: str, base: dict[str, torch.Tensor]) -> Path:
    """A run folder as `opdlab distill` leaves it: config.yaml, run.json, metrics.jsonl, final/."""
    (folder / "final").mkdir(parents=True)
    tuned = {k: v + (torch.rand(v.shape, generator=torch.Generator().manual_seed(1)) < 0.3) * 0.5
             for k, v in base.items()}
    save_file(tuned, str(folder / "final" / "model.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": method, "data": {"num_eval": 20}}))
    (folder / "run.json").write_text(json.dumps({"status": "finished", "method": method, "step": 3}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": 0.5}) + "\n")
    return folder


@pytest.fixture
def study(tmp_path):
    """study/{base, runs/opd (method sft: the folder name says otherwise), analysis/, compare/}."""
    root = tmp_path / "study"
    base = _tensors(0)
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    _run_folder(root / "runs" / "opd", "sft", base)
    return root


def test_analysis_records_method_and_paths_relative_to_itself(study, tmp_path, monkeypatch):
    monkeypatch.chdir(study.parent)  # relative arguments, as a user types them
    assert main(["analyze", "study/base", "study/runs/opd", "--out", "study/analysis/opd", "--workers", "1"]) == 0
    assert main(["compare", "study/base", "study/runs/opd", "study/runs/opd", "--out", "study/compare/a-b"]) == 0
    doc = json.loads((study / "analysis" / "opd" / "analysis.json").read_text())
    assert doc["method"] == "sft"  # from the run's own record, not from the folder name
    assert (doc["base"], doc["tuned"]) == ("../../base", "../../runs/opd")
    cmp = json.loads((study / "compare" / "a-b" / "compare.json").read_text())
    assert (cmp["base"], cmp["run_a"], cmp["run_b"]) == ("../../base", "../../runs/opd", "../../runs/opd")

    # The whole folder moves; read from elsewhere, the report still labels the analysis sft.
    moved = tmp_path / "elsewhere" / "study-copy"
    shutil.copytree(study, moved)
    shutil.rmtree(study)
    monkeypatch.chdir(tmp_path)
    found = D.discover(moved)
    (a,) = found.analyses
    assert a.method == "sft" and resolve_path(a.data["tuned"], a.path).resolve() == (moved / "runs" / "opd").resolve()


def test_analysis_of_checkpoints_that_are_no_run_records_no_method(study, tmp_path):
    out = tmp_path / "an-opd"  # a folder name with a method word in it
    assert main(["analyze", str(study / "base"), str(study / "runs" / "opd" / "final"), "--out", str(out)]) == 0
    assert json.loads((out / "analysis.json").read_text())["method"] == "sft"  # final/ of a run: the run's method
    plain = tmp_path / "plain"
    shutil.copytree(study / "runs" / "opd" / "final", plain)
    out2 = tmp_path / "opd"
    assert main(["analyze", str(study / "base"), str(plain), "--out", str(out2)]) == 0
    doc = json.loads((out2 / "analysis.json").read_text())
    assert "method" in doc and doc["method"] is None
    assert D.discover(out2).analyses[0].method is None  # recorded as none: the folder name "opd" is not guessed from
    del doc["method"]  # an analysis.json from before opdlab recorded it: the folder name still counts
    (out2 / "analysis.json").write_text(json.dumps(doc))
    assert D.discover(out2).analyses[0].method == "opd"


def test_experiment_paths_resolve_from_the_file_not_the_working_folder(study, tmp_path, monkeypatch):
    """subnetwork.json without num_eval: the report reads it from the config.yaml of a run the file names."""
    exp = study / "experiments" / "subnetwork"
    run = _run_folder(exp / "runs" / "full", "opd", _tensors(0))
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "opd", "data": {"num_eval": 37}}))
    monkeypatch.chdir(tmp_path)
    (exp / "subnetwork.json").write_text(json.dumps({"schema": 1, "kind": "subnetwork", "source": {},
                                                     "runs": {"full": {"run_dir": relative_path(run, exp)}}}))
    assert json.loads((exp / "subnetwork.json").read_text())["runs"]["full"]["run_dir"] == "runs/full"
    assert D.discover(exp).subnetwork["num_eval"] == 37


def test_relative_path_round_trip_and_names_that_are_not_paths(tmp_path):
    target = tmp_path / "a" / "b"
    target.mkdir(parents=True)
    folder = tmp_path / "x" / "y"
    folder.mkdir(parents=True)
    assert relative_path(target, folder) == "../../a/b"
    assert resolve_path("../../a/b", folder).resolve() == target.resolve()
    assert relative_path("smollm2-135m-instruct", folder) == "smollm2-135m-instruct"  # a model name stays
    assert resolve_path(str(target), folder) == target  # absolute paths (older files) read as they are
