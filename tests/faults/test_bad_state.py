"""Damaged state files: one line naming the file and the real line, exit 2, nothing rewritten.

run.json, demo.json and metrics.jsonl that are not UTF-8, not JSON or torn in the middle (a torn
*last* line is what a kill leaves, and is ignored), through `report`, `distill --resume`,
`experiment --resume` and `demo --resume`; and `demo --resume --out DIR` on a folder that is not
a demo, which must refuse instead of writing into it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import cli_error, tree_digest

from opdlab.cli import main


@pytest.fixture()
def run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _damage_line(path: Path, number: int, replacement: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = replacement
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("kind", ["torn", "latin1"])
def test_metrics_damaged_in_the_middle_names_the_line(run, capsys, kind):
    metrics = run / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) >= 3
    _damage_line(metrics, 2, b'{"step": 1, "train/lo' if kind == "torn" else '{"note": "caf\u00e9"}'.encode("latin-1"))
    before = tree_digest(run)
    for argv in (["report", str(run), "--out", str(run.parent / "rep")],
                 ["distill", "--resume", str(run), "--steps", "3"]):
        line = cli_error(argv, capsys)
        assert f"{metrics}: line 2" in line, line
    assert tree_digest(run) == before


def test_a_torn_last_line_is_still_ignored(run, capsys):
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 3, "tr')
    assert main(["report", str(run), "--out", str(run.parent / "rep")]) == 0


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b'{"status": "finished", "step": ', b"[1, 2]"])
def test_damaged_run_json(run, capsys, content):
    (run / "run.json").write_bytes(content)
    before = tree_digest(run)
    line = cli_error(["distill", "--resume", str(run), "--steps", "3"], capsys)
    assert str(run / "run.json") in line, line
    assert tree_digest(run) == before


def test_damaged_run_json_of_an_experiment_arm(run, tmp_path, capsys):
    """experiment --resume reads each finished arm's run.json for the student it started from."""
    exp = tmp_path / "exp"
    arm = exp / "runs" / "full"
    arm.parent.mkdir(parents=True)
    (exp / ".opdlab-output").write_text("")
    shutil.copytree(run, arm)
    cfg = json.loads((arm / "run.json").read_text())
    steps = cfg["step"]
    (arm / "run.json").write_text(json.dumps({**cfg, "student": 17}))
    line = cli_error(["experiment", "subnetwork", "--out", str(exp), "--resume", "--set", f"train.run.steps={steps}",
                      "--set", f"train.model.student={cfg.get('student')}", "--set", f"train.model.teacher={cfg.get('teacher')}",
                      "--set", "train.data.task=addition"], capsys)
    assert str(arm / "run.json") in line, line


# ----------------------------------------------------------------------------- demo.json


def test_demo_resume_on_a_folder_that_is_not_a_demo(run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for folder in (mine, run):  # a user's folder, and an opdlab folder of another kind
        before = tree_digest(folder)
        line = cli_error(["demo", "--resume", "--out", str(folder)], capsys)
        assert str(folder) in line and "not a demo folder" in line, line
        assert tree_digest(folder) == before


@pytest.mark.parametrize("content", [b"\xff{}", b'{"schema": 1, "stages": [', b'{"schema": 1, "stages": 3}'])
def test_damaged_demo_json(tmp_path, capsys, content):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / ".opdlab-output").write_text("")
    (demo / "demo.json").write_bytes(content)
    before = tree_digest(demo)
    line = cli_error(["demo", "--resume", "--out", str(demo)], capsys)
    assert str(demo / "demo.json") in line, line
    assert tree_digest(demo) == before
    line = cli_error(["report", str(demo)], capsys)
    assert str(demo / "demo.json") in line, line
