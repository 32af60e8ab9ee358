"""Exact streamed top-k / bottom-k weight sums against a sort-based reference."""

import pytest
import torch

from opdlab.analysis.selection import TopKSum, select_sums


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(v, w, k, largest):
    sv, _ = torch.sort(v, descending=largest)
    t = sv[k - 1]
    strict = (v > t) if largest else (v < t)
    tie = v == t
    wd = w.double()
    return float(wd[strict].sum()) + (k - int(strict.sum())) / int(tie.sum()) * float(wd[tie].sum())


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind", ["fp32-float-weights", "bf16-mask-weights"])
def test_matches_sort_reference_across_blocks(largest, kind):
    torch.manual_seed(0)
    v = torch.randn(5000).abs()
    if kind.startswith("bf16"):
        v = v.bfloat16().float()  # many ties
        w = torch.rand(5000) < 0.3
    else:
        w = torch.rand(5000)
    ks = [1, 50, 2500, 5000]
    sel = TopKSum(ks, largest)
    for vb, wb in zip(v.split(777), w.split(777)):
        sel.add_pass1(vb, wb)
    for vb, wb in zip(v.split(777), w.split(777)):
        sel.add_pass2(vb, wb)
    for k, got in zip(ks, sel.result()):
        assert got == pytest.approx(_reference(v, w, k, largest), rel=1e-12, abs=1e-9)


def test_clamped_k_selects_everything():
    v = torch.tensor([3.0, 1.0, 2.0])
    sel = TopKSum([10], largest=True, clamp_k=True)
    sel.add_pass1(v, v * v)
    sel.add_pass2(v, v * v)
    assert sel.result() == [14.0]


def test_zero_and_tiny_values_order_correctly():
    v = torch.tensor([0.0, 1e-40, 1e-30, 1.0])  # includes a subnormal
    w = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    sel = TopKSum([1, 2], largest=False)
    sel.add_pass1(v, w)
    sel.add_pass2(v, w)
    assert sel.result() == [1.0, 11.0]


@pytest.mark.parametrize("largest", [True, False])
def test_one_shot_selection_equals_two_streamed_passes(largest):
    torch.manual_seed(1)
    v = torch.randn(6000).abs()
    w = torch.rand(6000) < 0.4
    ks = [1, 7, 600, 3000, 6000]
    sel = TopKSum(ks, largest)
    for vb, wb in zip(v.split(1000), w.split(1000)):
        sel.add_pass1(vb, wb)
    for vb, wb in zip(v.split(1000), w.split(1000)):
        sel.add_pass2(vb, wb)
    assert select_sums(v, w, ks, largest) == sel.result()


@pytest.mark.parametrize("largest", [True, False])
def test_bf16_values_skip_pass_two_with_the_same_answer(largest):
    torch.manual_seed(2)
    v = torch.randn(5000).abs().bfloat16()  # few distinct values: many ties
    w = torch.rand(5000)
    ks = [1, 50, 2500, 5000]
    fast = TopKSum(ks, largest)
    fast.add_pass1(v, w)
    assert not fast.needs_pass2
    for k, got in zip(ks, fast.result()):
        assert got == pytest.approx(_reference(v.float(), w, k, largest), rel=1e-12, abs=1e-9)
    assert select_sums(v, w, ks, largest) == pytest.approx(select_sums(v.float(), w, ks, largest), rel=1e-12)
