"""Magnitude-mask enrichment and the streamed per-tensor pipeline (row blocks == whole tensor)."""

import math

import pytest
import torch

from opdlab.analysis.aggregate import derive
from opdlab.analysis.metrics_magnitude import mask_size, reconstructions
from opdlab.analysis.per_tensor import TensorSpec, analyze_tensor


pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(w: torch.Tensor, w2: torch.Tensor, name: str = "model.layers.0.mlp.up_proj.weight") -> TensorSpec:
    return TensorSpec(name, tuple(w.shape), lambda a, b: (w[a:b], w2[a:b]))


def _bump(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    w2 = w.clone().view(-1)
    w2[idx] = w2[idx] + 1.0  # visible in fp32 for every |w| here
    return w2.view(w.shape)


def test_updates_on_smallest_weights_give_enrichment_one_over_rho():
    torch.manual_seed(0)
    w = torch.randn(200, 100)  # fp32: no ties in |W|
    n = w.numel()
    idx = w.abs().view(-1).argsort()[: mask_size(n, 0.01)]  # exactly L_0.01
    r = derive(analyze_tensor(_spec(w, _bump(w, idx))).sums)
    for rho in (0.01, 0.05, 0.1, 0.2):
        assert r[f"low_magnitude_enrichment_rho_{rho:g}"] == pytest.approx(1 / rho, rel=1e-9)


def test_updates_on_largest_reconstruction_entries_give_principal_enrichment():
    torch.manual_seed(1)
    w = torch.randn(200, 100)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r_ = 10  # ρ = 0.1 → r = ⌊0.1·100⌋
    rec = ((u[:, :r_] * s[:r_]) @ vh[:r_]).abs().view(-1)
    idx = rec.argsort(descending=True)[: mask_size(w.numel(), 0.1)]
    r = derive(analyze_tensor(_spec(w, _bump(w, idx))).sums)
    assert r["principal_mask_enrichment_rho_0.1"] == pytest.approx(10.0, rel=1e-6)


def test_random_updates_give_enrichment_near_one():
    torch.manual_seed(2)
    w = torch.randn(300, 200).bfloat16()  # bf16: many ties in |W|, split evenly
    idx = torch.randperm(w.numel())[: w.numel() // 5]
    w2 = w.clone().view(-1)
    w2[idx] = (w2[idx].float() + 1.0).bfloat16()
    r = derive(analyze_tensor(_spec(w, w2.view(w.shape))).sums)
    for rho in (0.05, 0.1, 0.2):
        assert r[f"low_magnitude_enrichment_rho_{rho:g}"] == pytest.approx(1.0, abs=0.08)
        assert r[f"principal_mask_enrichment_rho_{rho:g}"] == pytest.approx(1.0, abs=0.08)


def test_incremental_reconstructions_match_direct():
    torch.manual_seed(3)
    w = torch.randn(50, 30)
    _, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    v = vh.T
    for r, rec in zip([1, 3, 6], reconstructions(w, v, [1, 3, 6])):
        ref = (w.double() @ v[:, :r] @ v[:, :r].T).abs().float()
        assert torch.allclose(rec, ref, atol=1e-5)


@pytest.mark.parametrize("shape", [(257, 64), (64, 257), (1000,)])
def test_row_blocks_give_the_same_sums_as_one_block(shape):
    torch.manual_seed(4)
    w = torch.randn(shape).bfloat16()
    mask = torch.rand(shape) < 0.3
    w2 = torch.where(mask, (w.float() * 1.1 + 0.01).bfloat16(), w)
    whole = analyze_tensor(_spec(w, w2)).sums
    blocked = analyze_tensor(_spec(w, w2), block_elems=64 * 17).sums  # 17-row blocks
    assert whole.keys() == blocked.keys()
    for k in whole:
        assert blocked[k] == pytest.approx(whole[k], rel=1e-6, abs=1e-9), k


def test_one_dimensional_tensor_has_no_spectrum():
    w = torch.linspace(-1, 1, 64)
    res = analyze_tensor(_spec(w, w + 0.5, "model.norm.weight"))
    assert res.spectrum is None and res.values["svd_method"] == ""
    r = derive(res.sums)
    assert r["sparsity"] == 0.0 and math.isnan(r["principal_energy_both_rho_0.1"])
    assert not math.isnan(r["low_magnitude_enrichment_rho_0.1"])


def test_randomized_path_close_to_exact_path():
    """Forced by exact_svd_max: projections within 0.02 absolute, enrichments within 5 %."""
    torch.manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(400, 150))
    v, _ = torch.linalg.qr(torch.randn(150, 150))
    w = (u * torch.logspace(1, -1, 150)) @ v.T
    w2 = w + 1e-3 * torch.randn(400, 150)
    exact = analyze_tensor(_spec(w, w2))
    rand = analyze_tensor(_spec(w, w2), exact_svd_max=100)
    assert exact.values["svd_method"] == "gram" and rand.values["svd_method"] == "randomized"
    a, b = derive(exact.sums), derive(rand.sums)
    for k in ("principal_energy_both_rho_0.1", "principal_energy_left_rho_0.1", "principal_energy_right_rho_0.2"):
        assert b[k] == pytest.approx(a[k], abs=0.02), k
    assert b["principal_mask_enrichment_rho_0.1"] == pytest.approx(a["principal_mask_enrichment_rho_0.1"], rel=0.05)
    assert b["sparsity"] == a["sparsity"]
