"""Data a user cares about is never deleted: each case through the real CLI (`opdlab.cli.main`).

1. `report --out DIR` writes only into a new or empty folder or one opdlab made; a user's own
   `figures/` (or anything else) in DIR is left alone.
2. A failed `--resume` of an experiment arm leaves the arm's checkpoints as they were (before,
   the failure was swallowed and the arm restarted with overwrite, deleting them).
3. `--out` (with `--overwrite`) that is, holds or lies inside one of the command's own inputs is
   refused before anything is deleted.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from helpers import SMALL, cli_error, tree_digest

from opdlab.cli import main
from opdlab.distill import checkpoint as ckpt
from opdlab.distill.checkpoint import list_checkpoints


@pytest.fixture()
def run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# ----------------------------------------------------------------------------- 1. report --out


def test_report_leaves_a_users_folder_alone(run, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "figures").mkdir(parents=True)
    (mine / "figures" / "plot.png").write_bytes(b"my own figure")
    (mine / "report.html").write_text("my own notes")
    before = tree_digest(mine)
    line = cli_error(["report", str(run), "--out", str(mine)], capsys)
    assert str(mine) in line and "opdlab did not write" in line
    assert tree_digest(mine) == before


def test_report_replaces_its_own_earlier_report(run, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out)]) == 0
    (out / "figures" / "stale.png").write_bytes(b"from an older report")
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert (out / "report.html").is_file() and not (out / "figures" / "stale.png").exists()


# ----------------------------------------------------------------------------- 2. experiment --resume


def _experiment_args(pair, out: Path, *extra: str) -> list[str]:
    train = [f"train.model.student={pair[0]}", f"train.model.teacher={pair[1]}", "train.data.task=addition",
             "train.run.steps=3", "train.run.save_every=1", "train.run.keep_checkpoints=3", "train.optim.lr=3e-3",
             "adamw_lrs=[0.003]", "sgd_lrs=[0.1]", "evidence_methods=[opd]"]
    train += ["train." + SMALL[i + 1] for i in range(0, len(SMALL), 2)]
    return ["experiment", "optimizers", "--out", str(out), *[a for kv in train for a in ("--set", kv)], *extra]


def _full_disk_from(monkeypatch, first_failing_step: int) -> None:
    real = ckpt.save_file

    def save_file(tensors, filename, *a, **k):
        step = next((int(p[5:]) for p in Path(filename).parts if p.startswith("step-")), None)
        if step is not None and step >= first_failing_step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", save_file)


def test_a_failed_experiment_resume_keeps_the_arms_checkpoints(pair, tmp_path, monkeypatch, capsys):
    out = tmp_path / "exp"
    arm = out / "runs" / "adamw-lr0.003"
    _full_disk_from(monkeypatch, 2)  # the first arm stops at step 2 with step-1 written
    cli_error(_experiment_args(pair, out), capsys)
    assert [s for s, _ in list_checkpoints(arm)] == [1]
    before = tree_digest(arm / "checkpoints")

    monkeypatch.undo()
    _full_disk_from(monkeypatch, 1)  # the resumed arm cannot write any checkpoint
    line = cli_error(_experiment_args(pair, out, "--resume"), capsys)
    assert "step-2: could not write the checkpoint" in line and "previous checkpoint is untouched" in line
    assert tree_digest(arm / "checkpoints") == before  # the message is true: step-1 is exactly as it was

    monkeypatch.undo()
    assert main(["distill", "--resume", str(arm)]) == 0  # and the arm continues from it


# ----------------------------------------------------------------------------- 3. --out over an input


def _refused(argv: list[str], capsys, *keep: Path) -> str:
    before = {p: tree_digest(p) for p in keep}
    line = cli_error(argv, capsys)
    assert "--out" in line and "input" in line, line
    assert {p: tree_digest(p) for p in keep} == before
    return line


def test_analyze_out_is_the_tuned_run(pair, run, capsys):
    _refused(["analyze", str(pair[0]), str(run), "--out", str(run), "--overwrite"], capsys, run, pair[0])


def test_analyze_out_lies_inside_or_holds_an_input(pair, run, tmp_path, capsys):
    _refused(["analyze", str(pair[0]), str(run), "--out", str(run / "final"), "--overwrite"], capsys, run)
    parent = run.parent  # holds the run (made an opdlab folder, so only the input check stops it)
    (parent / ".opdlab-output").write_text("")
    _refused(["analyze", str(pair[0]), str(run), "--out", str(parent), "--overwrite"], capsys, run)


def test_analyze_out_inside_a_run_folder_is_still_allowed(pair, run, capsys):
    """The documented layout `--out RUN/analysis` deletes nothing the analysis reads."""
    assert main(["analyze", str(pair[0]), str(run), "--out", str(run / "analysis")]) == 0
    assert main(["analyze", str(pair[0]), str(run), "--out", str(run / "analysis"), "--overwrite"]) == 0
    assert (run / "final" / "model.safetensors").is_file()


def test_distill_out_is_the_student_run(pair, run, capsys):
    argv = ["distill", "--student", str(run), "--teacher", str(pair[1]), "--task", "addition", "--steps", "1",
            "--out", str(run), "--overwrite", *SMALL]
    _refused(argv, capsys, run)


def test_compare_out_is_one_of_the_runs(pair, run, capsys):
    _refused(["compare", str(pair[0]), str(run), str(pair[0]), "--out", str(run), "--overwrite"], capsys, run)


def test_mask_out_is_its_input_mask(pair, run, tmp_path, capsys):
    m = tmp_path / "m.safetensors"
    assert main(["mask", str(pair[0]), str(run), "--out", str(m)]) == 0
    _refused(["mask", "--random-like", str(m), "--out", str(m), "--overwrite"], capsys, m)


def test_overwrite_does_not_follow_a_symlinked_out(pair, run, tmp_path, capsys):
    """`--out LINK --overwrite`: neither the link nor the folder it points to is replaced."""
    real = tmp_path / "real"
    assert main(["analyze", str(pair[0]), str(run), "--out", str(real)]) == 0
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = tree_digest(real)
    line = cli_error(["analyze", str(pair[0]), str(run), "--out", str(link), "--overwrite"], capsys)
    assert "symbolic link" in line and str(link) in line
    assert link.is_symlink() and tree_digest(real) == before


def test_delta_apply_out_is_its_base(pair, run, tmp_path, capsys):
    d = tmp_path / "d.safetensors"
    assert main(["delta", str(run), str(pair[0]), "--out", str(d)]) == 0
    _refused(["delta", "--apply", str(run), str(d), "--out", str(run), "--overwrite"], capsys, run, d)
