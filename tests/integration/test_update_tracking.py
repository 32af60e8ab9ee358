"""run.track_update_every: the update/... metrics logged during training equal `opdlab analyze` on the same checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from opdlab.cli import main
from opdlab.models.zoo import save_random_model
from opdlab.subnet import masks as M

SMALL = ["--set", "rollout.prompts_per_step=4", "--set", "rollout.samples_per_prompt=2",
         "--set", "rollout.max_new_tokens=6", "--set", "data.num_eval=4", "--set", "run.threads=1"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tracked")
    student = save_random_model(root / "student", seed=1)
    teacher = save_random_model(root / "teacher", seed=2, hidden_size=48)
    out = root / "run"
    code = main(["distill", "--student", str(student), "--teacher", str(teacher), "--task", "addition",
                 "--steps", "4", "--lr", "1e-3", "--out", str(out), *SMALL,
                 "--set", "run.track_update_every=2", "--set", "run.save_update_masks=true"])
    assert code == 0
    return student, out


def rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_logged_fractions_equal_analyze_on_the_final_checkpoint(tracked_run, tmp_path):
    student, out = tracked_run
    logged = rows(out)
    assert "update/changed_fraction" not in logged[1] and "update/changed_fraction" in logged[2]
    assert "update/jaccard_previous" not in logged[2] and "update/jaccard_previous" in logged[4]
    last = logged[4]
    assert 0 < last["update/changed_fraction"] < 1

    assert main(["analyze", str(student), str(out), "--out", str(tmp_path / "analysis")]) == 0
    summary = json.loads((tmp_path / "analysis" / "analysis.json").read_text())["summary"]
    # final/ is bf16, the analysis dtype: the tracker's counts and analyze's are the same coordinates
    assert last["update/changed_fraction"] == pytest.approx(1 - summary["sparsity"], abs=1e-12)
    assert last["update/relative_norm"] == pytest.approx(summary["relative_update_norm"], rel=1e-6)
    with open(tmp_path / "analysis" / "groups_block.csv") as fh:
        blocks = {r["group"]: r for r in csv.DictReader(fh)}
    assert {"attention", "mlp", "embedding", "norm"} <= set(blocks)
    for block, r in blocks.items():
        assert last[f"update/changed_fraction/{block}"] == pytest.approx(1 - float(r["sparsity"]), abs=1e-12), block
        assert last[f"update/relative_norm/{block}"] == pytest.approx(float(r["relative_update_norm"]), rel=1e-6), block


def test_mask_snapshots_are_the_extracted_masks_and_their_jaccard(tracked_run):
    student, out = tracked_run
    snap2, meta2 = M.load_mask(out / "masks" / "step-2.safetensors")
    snap4, meta4 = M.load_mask(out / "masks" / "step-4.safetensors")
    assert meta4["packing"] == "bits" and meta4["step"] == "4"
    extracted = M.extract_mask(student, out, atol=0.0, dtype="bf16", progress=False)
    assert set(snap4) == set(extracted)
    for name, m in extracted.items():
        assert torch.equal(snap4[name], m), name
    both = sum(int((snap2[n] & snap4[n]).sum()) for n in snap4)
    either = sum(int((snap2[n] | snap4[n]).sum()) for n in snap4)
    assert rows(out)[4]["update/jaccard_previous"] == pytest.approx(both / either)
    # a snapshot costs 1 bit a coordinate, 1/16 of the bf16 checkpoint (plus a header, large on this tiny model)
    assert (out / "masks" / "step-4.safetensors").stat().st_size < 0.15 * (out / "final" / "model.safetensors").stat().st_size
    # and is usable as a training mask
    fitted = M.fit_mask_to_model(snap4, [(n, torch.nn.Parameter(torch.zeros(m.shape))) for n, m in snap4.items()], "s")
    assert sum(int(m.sum()) for m in fitted.values()) == sum(int(m.sum()) for m in snap4.values())


def test_tracking_options_are_checked(tmp_path, capsys):
    code = main(["distill", "--steps", "1", "--out", str(tmp_path / "r"), "--set", "run.save_update_masks=true"])
    assert code == 2 and "run.save_update_masks" in capsys.readouterr().err
