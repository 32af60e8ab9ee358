"""The study's reported numbers beside opdlab's (report/study_column.py, report/study_numbers.json)."""

from __future__ import annotations

import pytest

from helpers import analysis, optimizers, subnetwork
from opdlab.report import findings as F
from opdlab.report.study_column import OPD_SETTING, OPSD_SETTING, closest_setting, study_entries, study_numbers
from opdlab.report.verdicts import FindingInputs


def by_figure(entries):
    return {e["figure"]: e for e in entries}


def test_reference_file_cites_its_source_and_caveat_and_holds_the_two_rows():
    ref = study_numbers()
    assert ref["source"] == "reported by arXiv 2606.13657" and "reading note" in ref["caveat"]
    rows = {r["pair"]: r for r in ref["global"]}
    assert rows[OPSD_SETTING]["sparsity_atol_1e-05"] == pytest.approx(0.895)
    assert rows[OPD_SETTING]["relative_update_norm"] == pytest.approx(0.00047)
    assert rows[OPD_SETTING]["stable_rank"] == pytest.approx(9.97)
    assert closest_setting("opsd") == OPSD_SETTING and closest_setting("opd") == OPD_SETTING
    assert closest_setting(None) == OPD_SETTING


def test_each_claim_gets_the_study_number_of_its_closest_setting_computed_the_study_way():
    main = analysis()
    main["summary"].update({"sparsity_atol_1e-05": 0.9, "median_top16_energy": 0.3, "median_stable_rank": 8.0})
    tensors = [{"name": f"m{i}", "principal_mask_enrichment_rho_0.1": v} for i, v in enumerate([0.2, 0.5, 3.0])]
    tensors.append({"name": "norm", "principal_mask_enrichment_rho_0.1": ""})  # not a matrix: no value
    inp = FindingInputs(analysis=main, tensors=tensors, method_labels={"opd": "opsd"},
                        by_method={"opd": main, "sft": analysis(), "rl": analysis()},
                        subnetwork=subnetwork(), optimizers=optimizers())
    entries = study_entries(inp)
    c1 = by_figure(entries[1])
    assert c1["sparsity (|Δ| ≤ 1e-5, bf16)"]["opdlab"] == 0.9
    assert c1["sparsity (|Δ| ≤ 1e-5, bf16)"]["study"] == pytest.approx(0.895)
    assert c1["‖Δ‖/‖W‖"]["setting"] == OPSD_SETTING
    # subspace: median over matrices (0.5), not an energy-weighted total; coverage = enrichment x 0.1
    c6 = entries[6][0]
    assert c6["opdlab"] == pytest.approx(0.05) and c6["study"] == pytest.approx(0.0439)
    c7 = entries[7][0]
    assert c7["opdlab"] == pytest.approx(main["summary"]["low_magnitude_enrichment_rho_0.1"] * 0.1)
    assert c7["study"] == pytest.approx(0.4857)
    c5 = by_figure(entries[5])
    assert c5["stable rank of Δ (median over matrices)"]["study"] == pytest.approx(7.77)
    c3 = by_figure(entries[3])
    assert c3["OPD-mask accuracy / full"]["opdlab"] == pytest.approx(0.58 / 0.6)
    assert c3["OPD-mask accuracy / full"]["study"] == pytest.approx(0.3510 / 0.3552)
    c4 = by_figure(entries[4])
    assert c4["SGD / AdamW best accuracy"]["opdlab"] == pytest.approx(0.3 / 0.6)
    assert c4["SGD / AdamW best accuracy"]["study"] == pytest.approx(0.3906 / 0.4302)
    c8 = by_figure(entries[8])
    assert c8["RL sparsity (|Δ| ≤ 1e-5)"]["study"] == pytest.approx(0.7789)
    # an OPD run with a separate teacher is set beside the DS-Qwen OPD row instead
    opd = study_entries(FindingInputs(analysis=main, method_labels={}))
    assert by_figure(opd[1])["‖Δ‖/‖W‖"]["study"] == pytest.approx(0.00047)
    assert by_figure(opd[1])["‖Δ‖/‖W‖"]["setting"] == OPD_SETTING


def test_build_findings_attaches_only_figures_opdlab_measured():
    rows = F.build_findings(FindingInputs(analysis=analysis()))
    by_number = {r.number: r for r in rows}
    assert by_number[1].study and all(e["opdlab"] is not None for e in by_number[1].study)
    assert by_number[3].study == [] and by_number[8].study == []     # no experiment, no baselines: nothing beside
