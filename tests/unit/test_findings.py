"""Findings rules on synthetic inputs: each claim holds, fails, is inconclusive or not measured as its rule says."""

from __future__ import annotations

import copy
import math

import pytest

from opdlab.report import findings as F
from opdlab.report import verdicts as V
from opdlab.report.findings import FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED, FindingInputs, build_findings

from helpers import FAILING_ANALYSIS, analysis, optimizers, subnetwork


TENSORS = [{"name": f"t{i}", "rows": 128, "cols": 512} for i in range(5)] + [{"name": "norm", "rows": None, "cols": None}]


def holding_inputs() -> FindingInputs:
    opd = analysis()
    rl = analysis(sparsity=0.85, rel=0.002, e_both=0.009, low_mag=1.5)
    sft = analysis(sparsity=0.1, rel=0.05, e_both=0.05, low_mag=1.0)
    return FindingInputs(analysis=opd, analysis_name="analysis opd", tensors=TENSORS,
                         by_method={"opd": opd, "sft": sft, "rl": rl}, subnetwork=subnetwork(),
                         optimizers=optimizers(), lr_sweep=None)


def failing_inputs() -> FindingInputs:
    # OPD looks like SFT (dense, large, on the principal subspace), SGD wins, a random mask works as well.
    sft = copy.deepcopy(FAILING_ANALYSIS)
    rl = analysis(sparsity=0.85, rel=0.002, e_both=0.009, low_mag=1.5)
    return FindingInputs(analysis=FAILING_ANALYSIS, tensors=TENSORS,
                         by_method={"opd": FAILING_ANALYSIS, "sft": sft, "rl": rl},
                         subnetwork=subnetwork(rand=0.59), optimizers=optimizers(sgdm=(0.2, 0.65, 0.3)))


def verdicts(rows) -> dict[int, str]:
    return {r.number: r.verdict for r in rows}


def test_every_claim_holds_on_holding_inputs():
    rows = build_findings(holding_inputs())
    assert [r.number for r in rows] == list(range(1, 9))
    assert verdicts(rows) == {i: HOLDS for i in range(1, 9)}, [(r.number, r.verdict, r.measured, r.caveat) for r in rows]


def test_every_claim_fails_on_failing_inputs():
    rows = build_findings(failing_inputs())
    assert verdicts(rows) == {i: FAILS for i in range(1, 9)}, [(r.number, r.verdict, r.measured, r.caveat) for r in rows]
    assert "does not hold" in F.format_table(rows)


def test_missing_inputs_are_not_measured():
    rows = build_findings(FindingInputs())
    assert verdicts(rows) == {i: NOT_MEASURED for i in range(1, 9)}
    assert all(r.caveat.startswith("needs ") and r.rule for r in rows)


def test_measured_values_come_from_the_data():
    rows = {r.number: r for r in build_findings(holding_inputs())}
    assert rows[1].values["sparsity"] == 0.8 and rows[1].values["relative_update_norm"] == 0.003
    assert rows[2].values["layer_spread"] == pytest.approx(0.0025 / 0.004)  # embed row is not a layer
    assert rows[2].values["ffn_attention_ratio"] == pytest.approx(0.004 / 0.0025)
    assert rows[3].values["recovery_opd"] == pytest.approx((0.58 - 0.1) / (0.6 - 0.1))
    assert rows[3].values["recovery_random"] == pytest.approx((0.3 - 0.1) / (0.6 - 0.1))
    assert rows[4].values["adamw"] == 0.6 and rows[4].values["best_sgd"] == 0.3
    assert rows[4].values["best_sgd_name"] == "sgd_momentum"
    assert rows[5].values["flat_top8"] == pytest.approx(8 / 128)
    assert rows[6].values["principal_energy_ratio"] == pytest.approx(0.8)
    assert "80.0%" in rows[1].measured and "0.003" in rows[1].measured


def test_precision_caveat_and_rounding_share():
    # 80 % unchanged in bf16, 2 % in fp32: (0.80 - 0.02) / 0.80 = 97.5 % of the sparsity is rounding.
    assert V.rounding_share(0.8, 0.02, 0.78) == pytest.approx(0.975)
    assert V.rounding_share(0.8, None, 0.4) == pytest.approx(0.5)  # fallback: below-half-ULP share
    assert V.rounding_share(0.8, None, None) is None
    assert V.rounding_share(0.8, 0.02, 0.78, rounded_away=0.6) == pytest.approx(0.75)  # direct count wins
    row1, row7 = (r for r in build_findings(holding_inputs()) if r.number in (1, 7))
    for row in (row1, row7):
        assert "97.5%" in row.caveat and "fp32 2.0%" in row.caveat
    # fp32 sparsity taken from a companion fp32 analysis when the summary lacks it
    a = analysis()
    del a["summary"]["sparsity_fp32"]
    fp32 = analysis(sparsity=0.4)
    fp32["dtype"] = "fp32"
    row = F.claim_sparse(FindingInputs(analysis=a, analysis_fp32=fp32))
    assert row.values["sparsity_fp32"] == 0.4 and row.values["rounding_share"] == pytest.approx(0.5)


def test_lr_sweep_note_in_sparsity_row():
    inp = holding_inputs()
    inp.lr_sweep = {"points": [{"lr": 1e-4, "sparsity_bf16": 0.05}, {"lr": 1e-6, "sparsity_bf16": 0.7}]}
    row = F.claim_sparse(inp)
    assert "70.0% at lr 1e-06" in row.caveat and "5.0% at lr 0.0001" in row.caveat


@pytest.mark.parametrize("kwargs, expected", [
    ({"sparsity": 0.35}, INCONCLUSIVE),            # between the fail and hold thresholds
    ({"rel": 0.02}, INCONCLUSIVE),
    ({"sparsity": 0.9, "rel": 0.1}, FAILS),        # sparse but large: not "small"
])
def test_sparsity_bands(kwargs, expected):
    assert F.claim_sparse(FindingInputs(analysis=analysis(**kwargs))).verdict == expected


def test_spread_needs_layers_and_blocks():
    a = analysis()
    a["groups"]["block"] = []
    assert F.claim_spread(FindingInputs(analysis=a)).verdict == NOT_MEASURED
    assert F.claim_spread(FindingInputs(analysis=analysis(mlp=0.0026))).verdict == INCONCLUSIVE  # ratio 1.04


def test_group_rows_in_the_analysis_writers_shape():
    """opdlab.analysis.aggregate names the group "group" and its size "num_params"; both are read."""
    a = analysis()
    for kind in ("layer", "block"):
        for row in a["groups"][kind]:
            row["group"] = row.pop(kind)
            row["num_params"] = row.pop("numel")
    a["groups"]["layer"][-1]["group"] = "none"
    ref = F.claim_spread(FindingInputs(analysis=analysis()))
    row = F.claim_spread(FindingInputs(analysis=a))
    assert row.verdict == HOLDS and row.values == ref.values
    assert F.group_rows(a, "block")[0]["numel"] == 2000


def test_spectrum_flat_baseline_decides_for_tiny_matrices():
    # 16-wide matrices: a flat spectrum already puts 8/16 = 0.5 in the top 8, so 0.62 is not concentrated.
    tiny = [{"name": "t", "shape": "16x64"}]
    row = F.claim_spectrum(FindingInputs(analysis=analysis(), tensors=tiny))
    assert row.values["flat_top8"] == 0.5 and row.verdict == FAILS
    # Convolution kernels count as shape[0] x rest; 1-D tensors are skipped.
    conv = [{"name": "c", "shape": "64x3x3x3"}, {"name": "n", "shape": "128"}]
    assert F.claim_spectrum(FindingInputs(analysis=analysis(), tensors=conv)).values["flat_top8"] == pytest.approx(8 / 27)
    row = F.claim_spectrum(FindingInputs(analysis=analysis(), tensors=[]))
    assert row.verdict == HOLDS and "skipped" in row.caveat


def test_subnetwork_noise_gain_and_missing_control():
    # Same recoveries, but on 20 eval prompts the gap is within 2 standard errors.
    noisy = subnetwork(full=0.6, opd=0.58, rand=0.45, n=20)
    assert F.claim_subnetwork(FindingInputs(subnetwork=noisy)).verdict == INCONCLUSIVE
    assert F.claim_subnetwork(FindingInputs(subnetwork=subnetwork(full=0.11))).verdict == INCONCLUSIVE  # no gain
    sub = subnetwork()
    del sub["runs"]["random"]
    row = F.claim_subnetwork(FindingInputs(subnetwork=sub))
    assert row.verdict == INCONCLUSIVE and "random" in row.caveat
    assert F.claim_subnetwork(FindingInputs(subnetwork=subnetwork(opd=0.4))).verdict == FAILS  # recovers 60 %


def test_subnetwork_falls_back_to_reverse_kl():
    sub = subnetwork()
    for r in [sub["source"], *sub["runs"].values()]:
        r["accuracy"] = None
    row = F.claim_subnetwork(FindingInputs(subnetwork=sub))
    assert row.values["metric"] == "reverse_kl"
    assert row.values["recovery_opd"] == pytest.approx((0.25 - 1.0) / (0.2 - 1.0))
    assert row.verdict == HOLDS


def test_optimizers_edge_of_grid_and_ties():
    row = F.claim_optimizers(FindingInputs(optimizers=optimizers(sgd=(0.1, 0.15, 0.2))))  # SGD best at largest lr
    assert row.verdict == INCONCLUSIVE and "edge" in row.caveat and "sgd" in row.caveat
    assert F.claim_optimizers(FindingInputs(optimizers=optimizers(sgdm=(0.2, 0.6, 0.3)))).verdict == FAILS  # tie
    assert F.claim_optimizers(FindingInputs(optimizers=optimizers(sgdm=(0.2, 0.59, 0.3)))).verdict == INCONCLUSIVE


def test_on_policy_signatures():
    base = holding_inputs()
    # SFT and RL indistinguishable: no signature separates them.
    same = FindingInputs(by_method={"opd": analysis(), "sft": analysis(), "rl": analysis()})
    row = F.claim_on_policy(same)
    assert row.verdict == INCONCLUSIVE and "0 signature" in row.caveat
    only_rl = FindingInputs(by_method={"opd": base.by_method["opd"], "rl": base.by_method["rl"]})
    assert F.claim_on_policy(only_rl).verdict == INCONCLUSIVE
    sig = F.signatures(analysis(rel=0.01)["summary"])
    assert sig["relative_update_norm"] == pytest.approx(math.log(0.01))


def test_format_table_lists_every_claim():
    text = F.format_table(build_findings(holding_inputs()))
    for i in range(1, 9):
        assert f"\n{i} " in text
