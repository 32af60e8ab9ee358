"""The bf16 half-ULP control on constructed values."""

import pytest
import torch

from opdlab.analysis.precision import half_ulp_bf16, precision_counts, precision_ratios


def test_half_ulp_hand_values():
    w = torch.tensor([1.0, 1.5, 3.0, -0.25, 0.0])
    # bf16 keeps 8 significant bits: ULP at 1 is 2^-7, at 2..4 it is 2^-6, at 0.25 it is 2^-9.
    assert half_ulp_bf16(w).tolist() == [2**-8, 2**-8, 2**-7, 2**-10, 2**-134]


def test_half_ulp_matches_next_bf16_number():
    torch.manual_seed(0)
    x = torch.randn(20000).bfloat16()
    away = torch.nextafter(x, (x.float().sign() * float("inf")).bfloat16()).float()
    assert torch.equal(half_ulp_bf16(x.float()), (away - x.float()).abs() / 2)


def test_constructed_case_separates_rounding_from_real_change():
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0, 4.0])
    # 1.0: half ULP 2^-8 ≈ 0.0039; 4.0: half ULP 2^-6 ≈ 0.0156
    d = torch.tensor([0.0, 0.001, 0.003, 0.01, 0.01, 0.02])
    c = precision_counts(w, w + d)
    assert c["changed_fp32"] == 5
    assert c["below_half_ulp"] == 4  # 0 (unchanged), 0.001, 0.003 at 1.0; 0.01 at 4.0
    assert c["rounded_away"] == 3  # changed in fp32, identical after both are cast to bf16
    r = precision_ratios(c)
    assert r["sparsity_fp32"] == pytest.approx(1 / 6)
    assert r["below_half_ulp_fraction"] == pytest.approx(4 / 6)
    assert r["rounded_away_fraction"] == pytest.approx(3 / 6)
    assert r["sparsity_fp32_atol_1e-05"] == pytest.approx(1 / 6)


def test_without_fp32_weights_everything_is_nan():
    import math

    assert all(math.isnan(v) for v in precision_ratios({}).values())
