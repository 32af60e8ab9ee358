"""Claims 3 and 4 decided on accuracy or on the continuous held-out metric, and the fp32 top-update arm."""

from __future__ import annotations

import pytest

from helpers import optimizers, subnetwork
from opdlab.report import findings as F
from opdlab.report.verdicts import FAILS, GAIN_Z, HOLDS, INCONCLUSIVE, FindingInputs, binomial_se, choose_metric


def with_kl_errors(sub: dict, kl: dict[str, float], se: float = 0.01) -> dict:
    """subnetwork.json with reverse KL values and standard errors on every row."""
    sub["source"].update(reverse_kl=kl["source"], reverse_kl_se=se)
    for arm, row in sub["runs"].items():
        row.update(reverse_kl=kl[arm], reverse_kl_se=se)
    return sub


def test_choose_metric_accuracy_beyond_three_errors_else_reverse_kl():
    n = 128
    src = {"accuracy": 0.05, "reverse_kl": 0.24, "reverse_kl_se": 0.01}
    big = {"accuracy": 0.40, "reverse_kl": 0.10, "reverse_kl_se": 0.01}
    choice = choose_metric(src, big, n)
    assert choice.metric == "accuracy" and choice.gained and "accuracy decided" in choice.reason
    small = {"accuracy": 0.10, "reverse_kl": 0.10, "reverse_kl_se": 0.01}   # +0.05 on 128: within 3 SE
    se = (binomial_se(0.05, n) ** 2 + binomial_se(0.10, n) ** 2) ** 0.5
    assert 0.05 < GAIN_Z * se
    choice = choose_metric(src, small, n)
    assert choice.metric == "reverse_kl" and choice.gained and "reverse KL decided" in choice.reason
    assert choice.gain == pytest.approx(0.14) and choice.gain_se == pytest.approx(0.02 ** 0.5 * 0.1)
    flat = {"accuracy": 0.06, "reverse_kl": 0.23, "reverse_kl_se": 0.01}
    assert choose_metric(src, flat, n).gained is False
    # files without standard errors: no choice (the legacy rule applies)
    assert choose_metric({"accuracy": 0.05, "reverse_kl": 0.2}, {"accuracy": 0.06, "reverse_kl": 0.1}, n).metric is None


def test_subnetwork_decided_on_reverse_kl_when_accuracy_is_noise_holds_and_fails():
    kl = {"source": 0.24, "full": 0.14, "subnetwork": 0.145, "top_update": 0.15, "random": 0.22}
    holding = with_kl_errors(subnetwork(full=0.10, opd=0.10, rand=0.09, source=0.05, n=128), kl)
    row = F.claim_subnetwork(FindingInputs(subnetwork=holding))
    assert row.values["metric"] == "reverse_kl" and row.verdict == HOLDS
    assert "reverse KL decided" in row.caveat and "reverse KL decided" in row.values["metric_reason"]
    assert row.values["recovery_opd"] == pytest.approx(0.95)
    # the random mask recovers as much: does not hold
    failing = with_kl_errors(subnetwork(full=0.10, opd=0.10, rand=0.10, source=0.05, n=128),
                             kl | {"random": 0.145})
    assert F.claim_subnetwork(FindingInputs(subnetwork=failing)).verdict == FAILS
    # full run's KL drop within 3 standard errors: nothing to recover
    flat = with_kl_errors(subnetwork(full=0.06, opd=0.06, rand=0.05, source=0.05, n=128),
                          kl | {"full": 0.22, "subnetwork": 0.22}, se=0.02)
    row = F.claim_subnetwork(FindingInputs(subnetwork=flat))
    assert row.verdict == INCONCLUSIVE and "nothing to recover" in row.caveat
    # OPD mask and random mask within 2 standard errors of each other: inconclusive
    close = with_kl_errors(subnetwork(full=0.10, opd=0.10, rand=0.09, source=0.05, n=128),
                           kl | {"random": 0.155}, se=0.01)
    assert F.claim_subnetwork(FindingInputs(subnetwork=close)).verdict == INCONCLUSIVE


def test_subnetwork_accuracy_decides_when_its_gain_is_large():
    kl = {"source": 0.24, "full": 0.14, "subnetwork": 0.145, "top_update": 0.15, "random": 0.22}
    sub = with_kl_errors(subnetwork(full=0.6, opd=0.58, rand=0.3, source=0.1, n=512), kl)
    row = F.claim_subnetwork(FindingInputs(subnetwork=sub))
    assert row.values["metric"] == "accuracy" and row.verdict == HOLDS and "accuracy decided" in row.caveat


def test_top_update_arm_is_reported_with_its_recovery_and_reading():
    kl = {"source": 0.24, "full": 0.14, "subnetwork": 0.145, "top_update": 0.145, "random": 0.22}
    sub = with_kl_errors(subnetwork(full=0.10, opd=0.10, rand=0.09, source=0.05, n=128), kl)
    sub["runs"]["top_update"] = {"run_dir": "runs/top_update", "accuracy": 0.1, "reverse_kl": 0.145,
                                 "reverse_kl_se": 0.01, "trainable_fraction": 0.2}
    row = F.claim_subnetwork(FindingInputs(subnetwork=sub))
    assert row.values["recovery_top_update"] == pytest.approx(0.95)
    assert "fp32 top-update mask 0.145" in row.measured and "nothing measurable beyond update size" in row.caveat
    # a much worse magnitude mask: the bf16 mask carries more than update size
    sub["runs"]["top_update"]["reverse_kl"] = 0.20
    row = F.claim_subnetwork(FindingInputs(subnetwork=sub))
    assert row.values["recovery_top_update"] == pytest.approx(0.4)
    assert "recovers more than update size alone explains" in row.caveat and row.verdict == HOLDS


def kl_optimizers(adamw_kl, sgd_kl, sgdm_kl, start=0.24, se=0.005, acc=0.06, acc_start=0.05, n=128) -> dict:
    opt = optimizers(n=n)
    kls = {"adamw": adamw_kl, "sgd": sgd_kl, "sgd_momentum": sgdm_kl}
    counters = {k: 0 for k in kls}
    for row in opt["sweep"]:
        o = row["optimizer"]
        row.update(accuracy=acc, accuracy_start=acc_start, reverse_kl=kls[o][counters[o]], reverse_kl_se=se,
                   reverse_kl_start=start, reverse_kl_se_start=se)
        counters[o] += 1
    return opt


def test_optimizers_on_reverse_kl_holds_fails_and_reports_grid_edges():
    holding = kl_optimizers((0.15, 0.12, 0.14), (0.22, 0.20, 0.21), (0.21, 0.18, 0.20))
    row = F.claim_optimizers(FindingInputs(optimizers=holding))
    assert row.values["metric"] == "reverse_kl" and row.verdict == HOLDS
    assert row.values["best_lr_at_edge"] == {"adamw": False, "sgd": False, "sgd_momentum": False}
    assert "best lr at a grid edge: none" in row.measured and "reverse KL decided" in row.caveat
    failing = kl_optimizers((0.15, 0.12, 0.14), (0.22, 0.20, 0.21), (0.21, 0.11, 0.20))
    assert F.claim_optimizers(FindingInputs(optimizers=failing)).verdict == FAILS
    edge = kl_optimizers((0.15, 0.12, 0.14), (0.22, 0.21, 0.19), (0.21, 0.18, 0.20))   # SGD best at its largest lr
    row = F.claim_optimizers(FindingInputs(optimizers=edge))
    assert row.verdict == INCONCLUSIVE and row.values["best_lr_at_edge"]["sgd"] and "edge" in row.caveat
    assert "best lr at a grid edge: sgd" in row.measured
    untrained = kl_optimizers((0.235, 0.236, 0.237), (0.24, 0.24, 0.24), (0.24, 0.24, 0.24), se=0.01)
    row = F.claim_optimizers(FindingInputs(optimizers=untrained))
    assert row.verdict == INCONCLUSIVE and "did not beat the source" in row.caveat
