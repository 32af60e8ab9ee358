"""`opdlab report DIR` on synthetic folders in the formats of docs/formats.md (no training, no weights)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from opdlab.cli import main

from helpers import analysis, run_report, subnetwork, write_analysis, write_demo, write_json, write_run


def verdicts(report_dir: Path) -> dict[int, str]:
    data = json.loads((report_dir / "findings.json").read_text())
    return {f["number"]: f["verdict"] for f in data["findings"]}


def images(html: str) -> list[str]:
    return re.findall(r'<img src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', html)


def test_demo_folder_report(tmp_path, capsys):
    root = write_demo(tmp_path / "demo")
    page = run_report(root)
    assert capsys.readouterr().out.strip() == str(page)
    html = page.read_text()
    assert 'id="findings-table"' in html and html.count('<tr class="v-') == 8
    assert verdicts(page.parent) == {i: "holds" for i in range(1, 9)}
    figures = sorted(p.name for p in (page.parent / "figures").iterdir())
    assert len(images(html)) == len(figures) == html.count("<img")
    # Training curves, lr sweep, subnetwork, optimizer sweep, second moment, overlap and the analysis PNG.
    for name in ("lr-sweep-sparsity.png", "subnetwork.png", "optimizer-sweep.png", "second-moment-cv.png",
                 "overlap.png", "curve-eval-accuracy.png", "opd-sparsity-by-layer.png"):
        assert name in figures, figures
    # Self-contained: nothing fetched from anywhere.
    assert not re.search(r'(src|href)="(https?:)?//', html) and "<script" not in html and "@import" not in html
    # The lr-sweep analyses are sweep points, not the main analysis; the fp32 twin feeds the caveat.
    findings = json.loads((page.parent / "findings.json").read_text())["findings"]
    assert findings[0]["source"] == "analysis opd" and findings[0]["values"]["sparsity_fp32"] == 0.02
    assert "storage rounding" in html and "Precision caveat" in html


def test_failing_claims_say_does_not_hold(tmp_path):
    page = run_report(write_demo(tmp_path / "demo", holds=False))
    assert verdicts(page.parent) == {i: "does not hold" for i in range(1, 9)}
    html = page.read_text()
    assert html.count('<span class="verdict fails">does not hold</span>') == 8


def test_single_run_folder(tmp_path):
    write_run(tmp_path / "opd", "opd")
    page = run_report(tmp_path / "opd", "--out", str(tmp_path / "r"))
    html = page.read_text()
    assert verdicts(page.parent) == {i: "not measured" for i in range(1, 9)}
    assert "Training runs" in html and len(images(html)) == 3  # accuracy, KL, loss curves
    assert "Parameter analyses" not in html


def test_single_analysis_folder(tmp_path):
    folder = tmp_path / "an"
    write_analysis(folder, analysis(), tuned="somewhere/final")
    page = run_report(folder)
    v = verdicts(page.parent)
    assert {v[i] for i in (1, 2, 5, 6, 7)} == {"holds"} and {v[i] for i in (3, 4, 8)} == {"not measured"}
    assert len(images(page.read_text())) == 1
    # Regenerating replaces the report and does not pick up its own output as input.
    page2 = run_report(folder)
    assert page2 == page and sorted((page.parent / "figures").iterdir())


def test_compare_folder_alone(tmp_path):
    root = write_demo(tmp_path / "demo")
    page = run_report(root / "compare" / "opd-vs-rl")
    assert "Overlap between runs" in page.read_text() and len(images(page.read_text())) == 1


def test_nothing_to_report_is_a_user_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "found nothing to report" in err and "\n" not in err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_corrupt_analysis_json_is_a_user_error(tmp_path, capsys):
    (tmp_path / "an").mkdir()
    (tmp_path / "an" / "analysis.json").write_text("{not json")
    assert main(["report", str(tmp_path / "an")]) == 2
    assert "analysis.json: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("schema", [2])
def test_newer_schema_is_refused(tmp_path, capsys, schema):
    write_json(tmp_path / "x" / "subnetwork.json", {"schema": schema, "runs": []})
    assert main(["report", str(tmp_path / "x")]) == 2
    assert "newer" in capsys.readouterr().err


def test_experiment_without_num_eval_reads_it_from_its_runs(tmp_path):
    """A 0.58 vs 0.45 accuracy gap is decisive on 512 prompts but noise on 20: num_eval comes from the run's config."""
    exp = tmp_path / "exp"
    sub = subnetwork(rand=0.45)
    del sub["num_eval"]
    # Written from another working folder: the reader finds runs/<arm> under the experiment folder.
    for arm, row in sub["runs"].items():
        row["run_dir"] = f"elsewhere/exp/runs/{arm}"
        write_run(exp / "runs" / arm, "opd", num_eval=20)
    write_json(exp / "subnetwork.json", sub)
    page = run_report(exp)
    findings = json.loads((page.parent / "findings.json").read_text())["findings"]
    assert findings[2]["verdict"] == "inconclusive" and "standard errors" in findings[2]["caveat"]
    sub["num_eval"] = 512
    write_json(exp / "subnetwork.json", sub)
    assert verdicts(run_report(exp).parent)[3] == "holds"


def test_wrong_field_type_is_a_user_error(tmp_path, capsys):
    write_json(tmp_path / "x" / "subnetwork.json", {"schema": 1, "source": {}, "runs": [{"kind": "full"}]})
    assert main(["report", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "subnetwork.json: field 'runs' must be an object keyed by arm" in err and err.count("\n") == 1


def test_analysis_without_pngs_gets_figures_drawn_from_its_tables(tmp_path):
    """An analysis folder in the analysis writer's row shape ("group", "num_params") and no PNGs:
    the report draws the analysis figures with opdlab.report.figures_analysis from the tables."""
    folder = tmp_path / "an"
    data = analysis()
    for kind in ("layer", "block"):
        for row in data["groups"][kind]:
            row["group"] = row.pop(kind)
            row["num_params"] = row.pop("numel")
    data["groups"]["module"] = [{"group": m, "num_params": 1000, "energy_share": e, "sparsity": 0.8,
                                 "relative_update_norm": 0.003} for m, e in (("q", 0.3), ("up", 0.7))]
    write_analysis(folder, data, tuned="x", png=False)
    header = "name,layer,module,block,shape,numel,delta_sq,source_sq,sparsity,relative_update_norm"
    lines = [header] + [f"model.layers.{i}.{m}.weight,{i},{m},b,8x8,64,0.01,1.0,0.8,0.1" for i in range(3)
                        for m in ("q", "up")]
    (folder / "tensors.csv").write_text("\n".join(lines) + "\n")
    page = run_report(folder)
    html = page.read_text()
    figures = sorted(p.name for p in (page.parent / "figures").iterdir())
    assert len(figures) == 5 and len(images(html)) == 5, figures
    assert "skipped" not in html
    assert verdicts(page.parent)[2] == "holds"
