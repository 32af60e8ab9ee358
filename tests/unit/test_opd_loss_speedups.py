"""The speed changes in the OPD loss path leave every number unchanged (docs/benchmarks.md, "Where the time goes")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opdlab.distill.losses import LOSS_KINDS, log_softmax_chunked, opd_loss, reverse_kl, token_mean


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 5, 11, generator=g) * 2
    t = torch.randn(3, 5, 11, generator=g) * 2
    y = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return s, t, y, mask


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_reverse_kl_statistic_is_bit_identical_to_a_separate_pass(kind: str) -> None:
    """opd_loss reuses the loss's per-token values as the reverse-KL statistic when kind is reverse_kl."""
    s, t, y, mask = _batch()
    n = int(mask.sum())
    _, stats = opd_loss(kind, s, t, y, mask, n, chunk=4)
    logp_s, logp_t = log_softmax_chunked(s, 4, mask), log_softmax_chunked(t, 4, mask)
    separate = token_mean(reverse_kl(logp_s, logp_t, mask), mask, n)  # the former second pass
    assert torch.equal(stats["reverse_kl"], separate)
    # and it is the reverse KL: an independent reference with F.kl_div
    ref = F.kl_div(t.log_softmax(-1), s.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert float(stats["reverse_kl"]) == pytest.approx(float((ref * mask).sum() / n), rel=1e-5)


def test_reverse_kl_loss_and_statistic_agree_and_gradient_flows() -> None:
    s, t, y, mask = _batch(1)
    s.requires_grad_(True)
    loss, stats = opd_loss("reverse_kl", s, t, y, mask, int(mask.sum()), chunk=7)
    assert torch.equal(loss.detach(), stats["reverse_kl"])
    assert not stats["reverse_kl"].requires_grad
    loss.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    assert float(s.grad[2, 1:].abs().sum()) == 0.0  # masked positions get no gradient
