"""Method opsd in the report, and the source-weights caveat for dequantized GGUF bases.

(a) an opsd run (OPD with a self-teacher) is found as the OPD run and its analysis feeds the findings;
(b) `opdlab analyze` on a base folder holding `opdlab_gguf.json` records `base_format`, and the report
    shows the caveat only then;
(c) `base_exact_zero_fraction` equals a hand count on planted tensors, in the analysis dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from opdlab.analysis import pairs
from opdlab.analysis.aggregate import derive, summary
from opdlab.analysis.per_tensor import TensorSpec, analyze_tensor
from opdlab.cli import main
from opdlab.errors import UserError
from opdlab.models.gguf import GGUF_INFO_FILE
from opdlab.report import discover as D
from opdlab.report.findings import build_findings

from helpers import analysis, run_report, write_analysis, write_run

GGUF_INFO = {"source": "/models/SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": "ab" * 32,
             "tensor_types": {"Q4_1": 210, "F32": 61, "Q8_0": 1}}
CAVEAT = "dequantized from a GGUF file"


# ----------------------------------------------------------------------------- (a) discovery


def _opsd_folder(root: Path, with_opd: bool = False) -> Path:
    """runs/{self,sft,rl} (run `self` has method opsd) and their analyses; folder names do not say 'opsd'."""
    for run, method in (("self", "opsd"), ("sft", "sft"), ("rl", "rl")):
        write_run(root / "runs" / run, method)
    write_analysis(root / "analysis" / "self", analysis(sparsity=0.7), tuned="../../runs/self/final", png=False)
    write_analysis(root / "analysis" / "sft", analysis(sparsity=0.1, rel=0.05, e_both=0.05, low_mag=1.0),
                   tuned="../../runs/sft/final", png=False)
    write_analysis(root / "analysis" / "rl", analysis(sparsity=0.85, rel=0.002, e_both=0.009, low_mag=1.5),
                   tuned="../../runs/rl/final", png=False)
    if with_opd:
        write_run(root / "runs" / "teacher-run", "opd")
        write_analysis(root / "analysis" / "teacher-run", analysis(sparsity=0.6), tuned="../../runs/teacher-run/final",
                       png=False)
    return root


def test_method_labels_and_families():
    assert D.method_from_name("analysis/opsd-lr1e-6") == "opsd"
    assert D.method_from_name("analysis/opd-lr1e-6") == "opd"
    assert D.method_from_name("compare/opd-vs-opsd") is None  # two method words: ambiguous
    assert [D.method_family(m) for m in ("opd", "opsd", "sft", "rl", "dpo", None)] == ["opd", "opd", "sft", "rl",
                                                                                      None, None]
    assert D.METHODS == ("opd", "sft", "rl")


def test_opsd_run_is_the_opd_run_for_the_findings(tmp_path):
    root = _opsd_folder(tmp_path / "demo")
    found = D.discover(root)
    by_name = {a.name: a for a in found.analyses}
    # The label comes from the tuned run folder's config.yaml; it counts as OPD.
    assert by_name["self"].method == "opsd" and by_name["self"].family == "opd"
    assert D.primary_analysis(found) is by_name["self"]
    assert D.method_analyses(found)["opd"] is by_name["self"]
    inp = D.findings_inputs(found)
    assert inp.analysis_name == "analysis self" and inp.analysis["summary"]["sparsity"] == 0.7
    assert set(inp.by_method) == {"opd", "sft", "rl"} and inp.method_labels == {"opd": "opsd"}
    rows = build_findings(inp)
    assert rows[0].values["sparsity"] == 0.7 and rows[0].source == "analysis self"
    assert rows[7].verdict == "holds" and "opsd 70.0%" in rows[7].measured  # claim 8 names the run's own label
    # The report lists the run and the analysis as opsd.
    html = run_report(root).read_text()
    assert html.count("<td>opsd</td>") == 2, "runs table and analyses table"


def test_plain_opd_is_preferred_over_opsd_and_explicit_label_is_read(tmp_path):
    root = _opsd_folder(tmp_path / "demo", with_opd=True)
    found = D.discover(root)
    assert D.primary_analysis(found).name == "teacher-run"  # the study's own method first
    assert D.findings_inputs(found).method_labels == {}
    data = json.loads((root / "analysis" / "sft" / "analysis.json").read_text())
    data["method"] = "opsd"  # an explicit label beats the run folder's config
    (root / "analysis" / "sft" / "analysis.json").write_text(json.dumps(data))
    assert {a.name: a.method for a in D.discover(root).analyses}["sft"] == "opsd"


# ----------------------------------------------------------------------------- (b) GGUF base caveat


def _tiny_pair(root: Path, gguf: bool) -> tuple[Path, Path, int, int]:
    """base/ and tuned/ fp32 folders of three tensors; base has a planted number of exact zeros.

    Returns (base, tuned, zeros in base, numel).
    """
    torch.manual_seed(0)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
            "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8),
            "model.norm.weight": torch.ones(8)}
    base["model.layers.0.mlp.up_proj.weight"].view(-1)[:13] = 0.0  # 13 planted zeros
    zeros = sum(int((t == 0).sum()) for t in base.values())
    numel = sum(t.numel() for t in base.values())
    tuned = {k: v + (torch.rand(v.shape) < 0.3) * 0.01 for k, v in base.items()}
    for name, tensors in (("base", base), ("tuned", tuned)):
        (root / name).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(root / name / "model.safetensors"))
    if gguf:
        (root / "base" / GGUF_INFO_FILE).write_text(json.dumps(GGUF_INFO))
    return root / "base", root / "tuned", zeros, numel


def _analyze(base: Path, tuned: Path, out: Path) -> dict:
    assert main(["analyze", str(base), str(tuned), "--out", str(out), "--workers", "1"]) == 0
    return json.loads((out / "analysis.json").read_text())


def test_gguf_base_records_base_format_and_report_shows_caveat(tmp_path):
    base, tuned, zeros, numel = _tiny_pair(tmp_path / "g", gguf=True)
    doc = _analyze(base, tuned, tmp_path / "an-gguf")
    assert doc["base_format"] == {"kind": "gguf", "tensor_types": GGUF_INFO["tensor_types"],
                                  "source": GGUF_INFO["source"]}
    assert doc["summary"]["base_exact_zero_fraction"] == pytest.approx(zeros / numel, abs=0)
    page = run_report(tmp_path / "an-gguf")
    html = page.read_text()
    assert CAVEAT in html and "16-level grid" in html and "Q8_0" in html
    # The measured zero fraction is in the paragraph and in the precision table (13/200 = 6.5 %).
    assert (zeros, numel) == (13, 200) and "6.5% of the base" in html and html.count("<td>6.5%</td>") == 1
    assert "base exact zeros" in html
    findings = json.loads((page.parent / "findings.json").read_text())["findings"]
    assert "GGUF" in findings[0]["caveat"] and "GGUF" in findings[6]["caveat"]
    assert findings[0]["values"]["base_exact_zero_fraction"] == pytest.approx(13 / 200)


def test_plain_base_has_no_base_format_and_no_caveat(tmp_path):
    base, tuned, _, _ = _tiny_pair(tmp_path / "p", gguf=False)
    doc = _analyze(base, tuned, tmp_path / "an-plain")
    assert "base_format" not in doc
    page = run_report(tmp_path / "an-plain")
    assert CAVEAT not in page.read_text() and "GGUF" not in page.read_text()
    findings = json.loads((page.parent / "findings.json").read_text())["findings"]
    assert "GGUF" not in findings[0]["caveat"]


def test_source_format_reads_the_record_and_refuses_a_broken_one(tmp_path):
    assert pairs.GGUF_INFO_FILE == GGUF_INFO_FILE  # the analysis reads the file the model loader writes
    base, _, _, _ = _tiny_pair(tmp_path / "s", gguf=True)
    # Opened as a folder or as its .safetensors file, the record is found.
    for path in (base, base / "model.safetensors"):
        assert pairs.source_format(pairs.Checkpoint(path))["tensor_types"] == GGUF_INFO["tensor_types"]
    (base / GGUF_INFO_FILE).write_text("{broken")
    with pytest.raises(UserError, match=GGUF_INFO_FILE):
        pairs.source_format(pairs.Checkpoint(base))


# ----------------------------------------------------------------------------- (c) exact zeros, by hand


def _spec(w: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype, name: str) -> TensorSpec:
    return TensorSpec(name, tuple(w.shape), lambda a, b: (w[a:b].to(dtype), w2[a:b].to(dtype)))


@pytest.mark.parametrize("block_elems", [1 << 23, 40])  # one block, and 5-row blocks of the 12x8 matrix
def test_base_exact_zero_fraction_is_a_hand_count(block_elems):
    """W (12x8) has 7 exact zeros and one 1e-44 (an fp32 subnormal that bf16 rounds to 0); a norm vector
    (16) has 2 zeros (one of them -0.0). Per analysis dtype the count is 9 (fp32) or 10 (bf16) of 112."""
    torch.manual_seed(3)
    w = torch.randn(12, 8)
    w.view(-1)[torch.tensor([0, 5, 17, 40, 41, 77, 95])] = 0.0
    w.view(-1)[50] = 1e-44
    v = torch.linspace(1, 2, 16)
    v[3], v[9] = 0.0, -0.0
    w2, v2 = w + 0.5, v + 0.5
    for dtype, expected in ((torch.float32, 9), (torch.bfloat16, 10)):
        results = [analyze_tensor(_spec(w, w2, dtype, "model.layers.0.mlp.up_proj.weight"), block_elems=block_elems),
                   analyze_tensor(_spec(v, v2, dtype, "model.norm.weight"), block_elems=block_elems)]
        assert [r.sums["source_zero"] for r in results] == [expected - 2, 2]
        assert derive(results[1].sums)["base_exact_zero_fraction"] == 2 / 16
        assert summary(results)["base_exact_zero_fraction"] == expected / 112  # numel-weighted
