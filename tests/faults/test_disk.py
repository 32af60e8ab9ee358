"""A full disk while writing: one line naming what could not be written, the previous checkpoint intact.

Write hooks (monkeypatched in-process) make checkpoint writes, renames, metrics appends and
analysis outputs fail the way a full disk does: `OSError(ENOSPC)` from Python file I/O,
torch.save's RuntimeError ("unexpected pos ...") and safetensors' SafetensorError. Where
the machine lets us mount one (root with CAP_SYS_ADMIN), a 8 MiB tmpfs is filled for real.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import cli_error, distill_args
from safetensors.torch import load_file

from opdlab.cli import main
from opdlab.distill import checkpoint as ckpt
from opdlab.distill import logging as metrics_logging
from opdlab.distill.checkpoint import list_checkpoints

FAIL_STEP = 3
RUN = ["--set", "run.save_every=1", "--set", "run.keep_checkpoints=3"]


def enospc(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path is not None else None)


def assert_previous_checkpoint_intact(run: Path, step: int) -> None:
    assert [s for s, _ in list_checkpoints(run)][-1] == step
    trainer = run / f"checkpoints/step-{step}/trainer_state"
    load_file(str(trainer / "master.safetensors"))
    torch.load(trainer / "optimizer.pt", weights_only=True)
    hidden = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not hidden, f"temporaries left behind: {hidden}"


def resume_finishes(run: Path) -> None:
    assert main(["distill", "--resume", str(run)]) == 0
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(5))


def _failing(kind: str):
    """A stand-in for one checkpoint writer that fails like a full disk at step FAIL_STEP."""
    state = {"saves": 0}
    real_save_file, real_torch_save = ckpt.save_file, torch.save

    def save_file(tensors, filename, *a, **k):
        if "step-" in str(filename) and f"step-{FAIL_STEP}" in str(filename) and kind == "oserror":
            raise enospc(filename)
        return real_save_file(tensors, filename, *a, **k)

    def torch_save(obj, f, *a, **k):
        if f"step-{FAIL_STEP}" in str(f) and kind == "torch":
            real_torch_save(obj, f, *a, **k)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_torch_save(obj, f, *a, **k)

    return save_file, torch_save, state


@pytest.mark.parametrize("kind", ["oserror", "torch"])
def test_full_disk_during_a_checkpoint(pair, tmp_path, monkeypatch, capsys, kind):
    run = tmp_path / "run"
    save_file, torch_save, _ = _failing(kind)
    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(ckpt.torch, "save", torch_save)
    line = cli_error(distill_args(pair, run, 4, *RUN), capsys)
    assert f"checkpoints/step-{FAIL_STEP}: could not write the checkpoint" in line
    assert "previous checkpoint is untouched" in line and f"--resume {run}" in line
    assert_previous_checkpoint_intact(run, FAIL_STEP - 1)
    monkeypatch.undo()
    resume_finishes(run)


def test_full_disk_at_the_rename(pair, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == f"step-{FAIL_STEP}":
            raise enospc(dst)
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    line = cli_error(distill_args(pair, run, 4, *RUN), capsys)
    assert f"step-{FAIL_STEP}: could not write the checkpoint (" in line and "No space left" in line
    monkeypatch.undo()
    assert_previous_checkpoint_intact(run, FAIL_STEP - 1)
    resume_finishes(run)


def test_full_disk_while_logging_metrics(pair, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_append = metrics_logging.append_jsonl

    def append(path, record):
        if record.get("step") == FAIL_STEP:
            raise enospc(path)
        return real_append(path, record)

    monkeypatch.setattr(metrics_logging, "append_jsonl", append)
    line = cli_error(distill_args(pair, run, 4, *RUN), capsys)
    assert f"{run / 'metrics.jsonl'}: No space left on device" in line and "--resume" in line
    monkeypatch.undo()
    assert_previous_checkpoint_intact(run, FAIL_STEP - 1)
    resume_finishes(run)


def test_full_disk_while_writing_analysis(pair, tmp_path, monkeypatch, capsys):
    out = tmp_path / "analysis"
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).startswith(str(out)):
            raise enospc(dst)
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    line = cli_error(["analyze", str(pair[0]), str(pair[0]), "--out", str(out)], capsys)
    assert "No space left on device" in line and str(out) in line


# ----------------------------------------------------------------------------- a real full filesystem


@pytest.fixture()
def tiny_disk(tmp_path):
    """An 8 MiB tmpfs at tmp_path/disk (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_really_full_disk_during_a_checkpoint(pair, tiny_disk, monkeypatch, capsys):
    run = tiny_disk / "run"
    ballast = tiny_disk / "ballast"
    real_save = ckpt.save_checkpoint

    def fill_after(run_dir, step, *a, **k):
        path = real_save(run_dir, step, *a, **k)
        if step == FAIL_STEP - 1:  # leave 64 KiB: enough for metrics lines, not for a checkpoint
            ballast.write_bytes(b"\0" * max(0, shutil.disk_usage(tiny_disk).free - 64 * 1024))
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", fill_after)
    line = cli_error(distill_args(pair, run, 4, *RUN), capsys)
    assert f"step-{FAIL_STEP}" in line and "free there" in line and "--resume" in line, line
    assert_previous_checkpoint_intact(run, FAIL_STEP - 1)
    monkeypatch.undo()
    ballast.unlink()
    resume_finishes(run)


# ----------------------------------------------------------------------------- safetensors outputs of analyze and mask

SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def _safetensors_disk_full(monkeypatch, name: str) -> None:
    """safetensors' save_file fails like a full disk (after writing part of the file) for files called `name`."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **k):
        if Path(filename).name == name:
            Path(filename).write_bytes(b"\0" * 100)  # half-written, as a real full disk leaves it
            raise SafetensorError(SAFETENSORS_FULL)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    for module in ("opdlab.analysis.writers", "opdlab.subnet.masks"):  # modules that imported it by name
        mod = __import__(module, fromlist=["x"])
        if hasattr(mod, "save_file"):
            monkeypatch.setattr(mod, "save_file", save_file)


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ".opdlab-output")


def test_full_disk_while_analyze_writes_spectra(pair, tmp_path, monkeypatch, capsys):
    out = tmp_path / "analysis"
    _safetensors_disk_full(monkeypatch, "spectra.safetensors")
    line = cli_error(["analyze", str(pair[0]), str(pair[0]), "--out", str(out)], capsys)
    assert f"{out / 'spectra.safetensors'}: " in line and "No space left on device" in line, line
    assert "spectra.safetensors" not in _visible(out) and not [n for n in _visible(out) if ".tmp-" in n]
    assert "analysis.json" not in _visible(out)  # written last: the folder does not look finished
    monkeypatch.undo()
    line = cli_error(["report", str(out), "--out", str(tmp_path / "rep")], capsys)
    assert "found nothing to report" in line or "incomplete" in line, line


def test_full_disk_while_mask_writes(pair, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.safetensors"
    _safetensors_disk_full(monkeypatch, "m.safetensors")
    line = cli_error(["mask", str(pair[0]), str(pair[0]), "--out", str(out)], capsys)
    assert f"{out}: " in line and "No space left on device" in line, line
    assert _visible(tmp_path) == [], _visible(tmp_path)  # neither the file nor a temporary


def test_interrupted_analyze_is_not_reported_as_complete(pair, tmp_path, monkeypatch, capsys):
    """A kill after the tables but before the last file: report must not take the folder as a finished analysis."""
    from opdlab.report import figures_analysis

    out = tmp_path / "analysis"

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands in for SIGKILL at this moment: nothing after it runs

    monkeypatch.setattr(figures_analysis, "magnitude_enrichment_by_rho", killed)
    assert main(["analyze", str(pair[0]), str(pair[0]), "--out", str(out)]) == 130
    monkeypatch.undo()
    line = cli_error(["report", str(out), "--out", str(tmp_path / "rep")], capsys)
    assert "found nothing to report" in line or "incomplete" in line, line


def test_really_full_disk_while_mask_writes(pair, tiny_disk, capsys):
    out = tiny_disk / "m.safetensors"
    ballast = tiny_disk / "ballast"
    ballast.write_bytes(b"\0" * max(0, shutil.disk_usage(tiny_disk).free - 8 * 1024))
    line = cli_error(["mask", str(pair[0]), str(pair[0]), "--out", str(out)], capsys)
    assert str(out) in line and "No space left on device" in line, line
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["ballast"]
