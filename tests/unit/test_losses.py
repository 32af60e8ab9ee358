"""OPD / SFT / RL losses against independent references (kl_div, hand-computed values, float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from opdlab.distill import losses as L


def _pair(B: int = 2, T: int = 3, V: int = 7, seed: int = 0, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * scale, torch.randn(B, T, V, generator=g) * scale


def _jsd_reference_f64(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Direct textbook form in float64, mixture by logsumexp: [beta KL(t||M) + (1-beta) KL(s||M)] / (beta(1-beta))."""
    ls, lt = logp_s.double(), logp_t.double()
    log_m = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), dim=0)
    kl_t_m = (lt.exp() * (lt - log_m)).sum(-1)
    kl_s_m = (ls.exp() * (ls - log_m)).sum(-1)
    return (beta * kl_t_m + (1 - beta) * kl_s_m) / (beta * (1 - beta))


# --- full-vocabulary KLs ----------------------------------------------------------------------


def test_reverse_and_forward_kl_match_torch_kl_div() -> None:
    s, t = _pair()
    logp_s, logp_t = s.log_softmax(-1), t.log_softmax(-1)
    # kl_div(input, target) = sum target * (log target - input): target is the first KL argument.
    ref_reverse = F.kl_div(logp_t, logp_s, reduction="none", log_target=True).sum(-1)
    ref_forward = F.kl_div(logp_s, logp_t, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(L.reverse_kl(logp_s, logp_t), ref_reverse, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(L.forward_kl(logp_s, logp_t), ref_forward, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ref_reverse, ref_forward)  # the two directions really differ here


def test_three_token_vocabulary_by_hand() -> None:
    # p_s = (0.5, 0.25, 0.25), p_t = (0.25, 0.25, 0.5)
    # reverse KL = 0.5 ln2 + 0.25 ln1 + 0.25 ln(0.5)   = 0.25 ln 2 = 0.1732868
    # forward KL = 0.25 ln(0.5) + 0.25 ln1 + 0.5 ln 2  = 0.25 ln 2 (symmetric by construction)
    # p_s = (0.5, 0.25, 0.25), p_t = (0.8, 0.1, 0.1):
    # reverse = 0.5 ln(0.5/0.8) + 2 * 0.25 ln(0.25/0.1) = -0.2350018 + 0.4581454 = 0.2231436
    # forward = 0.8 ln(0.8/0.5) + 2 * 0.1 ln(0.1/0.25) = 0.3760029 - 0.1832581 = 0.1927448
    p_s = torch.tensor([[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]])
    p_t = torch.tensor([[[0.25, 0.25, 0.5], [0.8, 0.1, 0.1]]])
    rev = L.reverse_kl(p_s.log(), p_t.log())
    fwd = L.forward_kl(p_s.log(), p_t.log())
    torch.testing.assert_close(rev, torch.tensor([[0.1732868, 0.2231436]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(fwd, torch.tensor([[0.1732868, 0.1927448]]), atol=1e-6, rtol=0)
    # k3 at y = 0 for the second position: r = 0.8/0.5 = 1.6, k3 = 0.6 - ln 1.6 = 0.1299963
    k3 = L.k3(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.8)]]))
    torch.testing.assert_close(k3, torch.tensor([[0.1299963]]), atol=1e-6, rtol=0)
    # k2 = 0.5 * ln(0.5/0.8)^2 = 0.5 * (-0.4700036)^2 = 0.5 * 0.2209034 = 0.1104517
    k2 = L.k2(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.8)]]))
    torch.testing.assert_close(k2, torch.tensor([[0.1104517]]), atol=1e-6, rtol=0)


# --- generalized JSD -------------------------------------------------------------------------


def test_jsd_endpoints_are_forward_and_reverse_kl() -> None:
    s, t = _pair(seed=1, scale=1.0)
    logp_s, logp_t = s.log_softmax(-1), t.log_softmax(-1)
    fwd, rev = L.forward_kl(logp_s, logp_t), L.reverse_kl(logp_s, logp_t)
    torch.testing.assert_close(L.generalized_jsd(logp_s, logp_t, 0.0), fwd, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(L.generalized_jsd(logp_s, logp_t, 1.0), rev, atol=1e-6, rtol=1e-5)
    # Near the ends the value approaches the endpoint at rate O(beta) (slope ~ a chi-square
    # divergence, a few units for these logits): within 1e-3 at 1e-4, within 1e-5 at 1e-7.
    torch.testing.assert_close(L.generalized_jsd(logp_s, logp_t, 1e-4), fwd, atol=1e-3, rtol=0)
    torch.testing.assert_close(L.generalized_jsd(logp_s, logp_t, 1 - 1e-4), rev, atol=1e-3, rtol=0)
    torch.testing.assert_close(L.generalized_jsd(logp_s, logp_t, 1e-7), fwd, atol=1e-5, rtol=0)
    torch.testing.assert_close(L.generalized_jsd(logp_s, logp_t, 1 - 1e-7), rev, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_jsd_matches_float64_reference_on_a_fine_grid_without_jumps(scale: float) -> None:
    s, t = _pair(B=3, T=4, V=11, seed=2, scale=scale)
    logp_s, logp_t = s.log_softmax(-1), t.log_softmax(-1)
    # The float64 textbook form is exact enough everywhere on this grid (its cancellation error
    # ~1e-16 / beta); the fp32 naive form would be off by ~4e-2 at beta = 1e-6 with scale 3.
    near_ends = [10.0**-k for k in range(1, 10)]
    grid = near_ends + [i / 200 for i in range(1, 200)] + [1 - b for b in near_ends]
    for beta in grid:
        got = L.generalized_jsd(logp_s, logp_t, beta)
        torch.testing.assert_close(got.double(), _jsd_reference_f64(logp_s, logp_t, beta), atol=1e-6, rtol=1e-5)
    # No jumps into the endpoints: approaching 0 (or 1) geometrically, the distance to the
    # endpoint value shrinks every time, by > 1000x over the approach (the TRL form would not
    # shrink at all: it tends to 0, not to the endpoint value). The slope near the ends is a
    # chi-square-like divergence, large for peaked logits, hence the relative criterion.
    for end, approach in ((0.0, near_ends), (1.0, [1 - b for b in near_ends])):
        at_end = L.generalized_jsd(logp_s, logp_t, end)
        gaps = [float((L.generalized_jsd(logp_s, logp_t, b) - at_end).abs().max()) for b in approach]
        assert all(later <= earlier + 1e-6 for earlier, later in zip(gaps, gaps[1:])), gaps
        assert gaps[-1] < 1e-3 * gaps[0], gaps
    # And on the uniform grid, each step of 0.005 changes values by at most 0.005 * the largest
    # slope of the float64 reference on that grid (a jump would break this).
    uniform = [i / 200 for i in range(1, 200)]
    ours = torch.stack([L.generalized_jsd(logp_s, logp_t, b) for b in uniform]).double()
    ref = torch.stack([_jsd_reference_f64(logp_s, logp_t, b) for b in uniform])
    assert (ours.diff(dim=0).abs() <= ref.diff(dim=0).abs() + 1e-5).all()


def test_jsd_symmetric_case_against_direct_formula() -> None:
    # At beta = 0.5 with M = (p+q)/2, JSD/(0.25) = 4 * JSD_classic, which is symmetric in p and q.
    s, t = _pair(seed=3)
    logp_s, logp_t = s.log_softmax(-1), t.log_softmax(-1)
    p, q = logp_s.double().exp(), logp_t.double().exp()
    m = (p + q) / 2
    classic = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    got = L.generalized_jsd(logp_s, logp_t, 0.5)
    torch.testing.assert_close(got.double(), 4 * classic, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, L.generalized_jsd(logp_t, logp_s, 0.5), atol=1e-6, rtol=1e-5)


def test_jsd_is_finite_with_extreme_log_ratios_and_has_finite_grads() -> None:
    s = torch.tensor([[[0.0, -150.0, 3.0, -80.0]]], requires_grad=True)
    t = torch.tensor([[[-150.0, 0.0, 3.0, 90.0]]])
    for beta in (0.0, 1e-6, 0.3, 1 - 1e-6, 1.0):
        val = L.generalized_jsd(s.log_softmax(-1), t.log_softmax(-1), beta)
        (grad,) = torch.autograd.grad(val.sum(), s)
        assert torch.isfinite(val).all() and torch.isfinite(grad).all(), beta
    ref = _jsd_reference_f64(s.detach().log_softmax(-1), t.log_softmax(-1), 0.3)
    torch.testing.assert_close(L.generalized_jsd(s.log_softmax(-1), t.log_softmax(-1), 0.3).double(), ref, atol=1e-4, rtol=1e-5)


# --- top-k and sampled-token estimators ------------------------------------------------------


def test_topk_with_k_equal_vocab_is_full_reverse_kl_and_small_k_is_a_lower_bound() -> None:
    s, t = _pair(V=9, seed=4)
    logp_s, logp_t = s.log_softmax(-1), t.log_softmax(-1)
    full = L.reverse_kl(logp_s, logp_t)
    torch.testing.assert_close(L.topk_reverse_kl(logp_s, logp_t, 9), full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(L.topk_reverse_kl(logp_s, logp_t, 50), full, atol=1e-6, rtol=1e-5)
    # Bucketing is a coarsening, so by the data-processing inequality it cannot exceed the full KL.
    assert bool((L.topk_reverse_kl(logp_s, logp_t, 3) <= full + 1e-6).all())
    # k = 1 by hand: bucket {argmax} vs rest.
    ls, lt = logp_s[0, 0], logp_t[0, 0]
    i = int(ls.argmax())
    ps, pt = ls.exp()[i], lt.exp()[i]
    by_hand = ps * (ps / pt).log() + (1 - ps) * ((1 - ps) / (1 - pt)).log()
    torch.testing.assert_close(L.topk_reverse_kl(logp_s, logp_t, 1)[0, 0], by_hand, atol=1e-5, rtol=1e-5)
    # gradients stay finite when the tail is empty (k = V)
    s.requires_grad_(True)
    (grad,) = torch.autograd.grad(L.topk_reverse_kl(s.log_softmax(-1), logp_t, 9).sum(), s)
    assert torch.isfinite(grad).all()


def test_sampled_estimators_expectation_matches_full_reverse_kl() -> None:
    torch.manual_seed(0)
    logits_s, logits_t = torch.tensor([1.0, 0.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, -0.5, 0.2])
    logp_s, logp_t = logits_s.log_softmax(-1), logits_t.log_softmax(-1)
    exact = float(L.reverse_kl(logp_s[None, None], logp_t[None, None]))  # 0.3203
    n = 200_000
    y = torch.multinomial(logp_s.exp(), n, replacement=True)
    s_y, t_y = logp_s[y][None], logp_t[y][None]
    k1_value = (s_y - t_y).mean()  # the k1 KL estimate (what the policy-gradient advantage negates)
    k3_value = L.k3(s_y, t_y).mean()
    # Standard errors here are 0.0017 (k1) and 0.0006 (k3): 0.01 is ~6 sigma for k1, ~18 for k3.
    assert abs(float(k1_value) - exact) < 0.01, (float(k1_value), exact)
    assert abs(float(k3_value) - exact) < 0.01, (float(k3_value), exact)
    # k2 estimates something else (it is >= the KL to second order), so it must NOT be asserted equal.


def _expected_grad(per_token_fn, logits: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
    """Exact E_{y ~ p_s}[grad per_token(y)] by enumerating the vocabulary (no sampling noise)."""
    V = logits.shape[-1]
    x = logits.clone().requires_grad_(True)
    logp_s = x.log_softmax(-1).expand(V, V)
    logp_t = logits_t.log_softmax(-1).expand(V, V)
    y = torch.arange(V)
    s_y, t_y = logp_s.gather(-1, y[:, None])[:, 0], logp_t.gather(-1, y[:, None])[:, 0]
    weights = logits.softmax(-1)  # p_s(y), a constant (it is the sampling distribution)
    per_token = per_token_fn(s_y[None], t_y[None])[0]
    (grad,) = torch.autograd.grad((weights * per_token).sum(), x)
    return grad


def test_k1_and_k2_gradient_expectations_equal_reverse_kl_gradient_and_k3_gives_forward() -> None:
    logits_s, logits_t = torch.tensor([1.0, 0.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, -0.5, 0.2])
    x = logits_s.clone().requires_grad_(True)
    lt = logits_t.log_softmax(-1)
    (g_rev,) = torch.autograd.grad(L.reverse_kl(x.log_softmax(-1)[None, None], lt[None, None]).sum(), x)
    (g_fwd,) = torch.autograd.grad(L.forward_kl(x.log_softmax(-1)[None, None], lt[None, None]).sum(), x)
    g_k1 = _expected_grad(lambda s, t: L.k1_policy_gradient(s, t), logits_s, logits_t)
    g_k2 = _expected_grad(L.k2, logits_s, logits_t)
    g_k3 = _expected_grad(L.k3, logits_s, logits_t)
    torch.testing.assert_close(g_k1, g_rev, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_k2, g_rev, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_k3, g_fwd, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(g_rev, g_fwd, atol=1e-3)


def test_k1_uses_old_logprobs_for_the_advantage_only() -> None:
    s = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    t = torch.tensor([[-1.5, -1.0]])
    old = torch.tensor([[-0.5, -3.0]])
    loss = L.k1_policy_gradient(s, t, old)
    # old - t = (1.0, -2.0), advantage = (-1.0, 2.0); loss = -adv * s = (1 * -1, -2 * -2) = (-1, 4)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, 4.0]]))
    (grad,) = torch.autograd.grad(loss.sum(), s)
    torch.testing.assert_close(grad, torch.tensor([[1.0, -2.0]]))  # d/ds = -advantage; old, t get none


# --- reduction, masking, chunking -----------------------------------------------------------


def test_gradient_accumulation_with_global_token_count_equals_one_batch() -> None:
    torch.manual_seed(0)
    B, T, V = 4, 6, 5
    student = torch.randn(B, T, V)
    teacher = torch.randn(B, T, V)
    y = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    mask[0, 2:] = 0  # sequences of different lengths: micro-batches hold 4+6 and 6+1 tokens
    mask[3, 1:] = 0
    total = int(mask.sum())
    for kind in L.LOSS_KINDS:
        w = student.clone().requires_grad_(True)
        loss, _ = L.opd_loss(kind, w, teacher, y, mask, total)
        (g_full,) = torch.autograd.grad(loss, w)
        w = student.clone().requires_grad_(True)
        accum, per_micro = torch.zeros_like(w), torch.zeros_like(w)
        for rows in (slice(0, 2), slice(2, 4)):
            part, _ = L.opd_loss(kind, w[rows], teacher[rows], y[rows], mask[rows], total)
            accum += torch.autograd.grad(part, w)[0]
            wrong, _ = L.opd_loss(kind, w[rows], teacher[rows], y[rows], mask[rows], int(mask[rows].sum()))
            per_micro += torch.autograd.grad(wrong, w)[0] / 2  # mean of micro-batch means
        torch.testing.assert_close(accum, g_full, atol=1e-7, rtol=1e-5, msg=kind)
        assert not torch.allclose(per_micro, g_full, atol=1e-6), kind  # per-micro-batch normalization differs


def test_zero_valid_tokens_gives_finite_zero_loss_with_a_grad_path() -> None:
    logits = torch.randn(2, 3, 5, requires_grad=True)
    mask = torch.zeros(2, 3)
    for kind in L.LOSS_KINDS:
        loss, stats = L.opd_loss(kind, logits, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), mask, 0)
        assert loss.item() == 0.0 and loss.requires_grad, kind
        loss.backward()
        assert torch.isfinite(logits.grad).all() and float(stats["reverse_kl"]) == 0.0
    assert L.token_mean(torch.ones(2, 3), mask, torch.tensor(0)).item() == 0.0


def test_masked_positions_contribute_nothing_even_with_garbage_logits() -> None:
    torch.manual_seed(1)
    B, T, V = 2, 4, 6
    student, teacher = torch.randn(B, T, V), torch.randn(B, T, V)
    y = torch.randint(0, V, (B, T))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    garbage_s, garbage_t = student.clone(), teacher.clone()
    garbage_s[mask == 0] = float("inf")
    garbage_t[mask == 0] = torch.tensor([float("nan"), -float("inf"), 1e30, 0, 0, 0])
    for kind in L.LOSS_KINDS:
        clean_w = student.clone().requires_grad_(True)
        clean, _ = L.opd_loss(kind, clean_w, teacher, y, mask, 5, beta=0.3, top_k=2)
        dirty_w = garbage_s.clone().requires_grad_(True)
        dirty, stats = L.opd_loss(kind, dirty_w, garbage_t, y, mask, 5, beta=0.3, top_k=2)
        torch.testing.assert_close(dirty, clean, msg=kind)
        (g_clean,) = torch.autograd.grad(clean, clean_w)
        (g_dirty,) = torch.autograd.grad(dirty, dirty_w)
        assert torch.isfinite(g_dirty).all() and torch.isfinite(stats["reverse_kl"]), kind
        torch.testing.assert_close(g_dirty, g_clean, msg=kind)
        assert bool((g_dirty[mask == 0] == 0).all()), kind


def test_chunked_log_softmax_equals_plain_and_upcasts() -> None:
    logits = torch.randn(3, 5, 17, dtype=torch.bfloat16)
    plain = logits.float().log_softmax(-1)
    for chunk in (1, 4, 7, 15, 1000):
        got = L.log_softmax_chunked(logits, chunk)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, plain, atol=0, rtol=0)


def test_teacher_logits_from_inference_mode_work_for_every_kind() -> None:
    student = torch.randn(2, 3, 5, requires_grad=True)
    with torch.inference_mode():  # how the trainer runs the teacher
        teacher = torch.randn(2, 3, 5) * 2
    y, mask = torch.randint(0, 5, (2, 3)), torch.ones(2, 3)
    for kind in L.LOSS_KINDS:
        loss, _ = L.opd_loss(kind, student, teacher, y, mask, 6)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, kind


def test_opd_loss_rejects_unknown_kind_and_unsliced_teacher() -> None:
    s, t = torch.randn(1, 2, 4), torch.randn(1, 2, 6)
    y, mask = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
    with pytest.raises(ValueError, match="slice the teacher"):
        L.opd_loss("reverse_kl", s, t, y, mask, 2)
    with pytest.raises(ValueError, match="unknown kind"):
        L.opd_loss("kl", s, t[..., :4], y, mask, 2)
    loss, stats = L.opd_loss("reverse_kl", s, t[..., :4], y, mask, 2)
    torch.testing.assert_close(loss, stats["reverse_kl"])


# --- SFT and RL --------------------------------------------------------------------------------


def test_sft_loss_is_mean_nll_of_targets() -> None:
    logits = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    ref = F.cross_entropy(logits[mask.bool()], y[mask.bool()])
    torch.testing.assert_close(L.sft_loss(logits.log_softmax(-1), y, mask, 4), ref)


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.25, population std sqrt(0.1875) = 0.4330127 -> (1.7320508, -0.5773503 x3)
    adv = L.group_advantages(rewards, 4, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv[:4], torch.tensor([1.7320508, -0.5773503, -0.5773503, -0.5773503]))
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: no signal, no division by zero
    torch.testing.assert_close(L.group_advantages(rewards, 4, normalize_std=False)[:2], torch.tensor([0.75, -0.25]))
    with pytest.raises(ValueError, match="groups of 3"):
        L.group_advantages(rewards, 3)


def test_policy_gradient_loss_and_kl_penalty() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss = L.policy_gradient_loss(logp, adv, mask, 3)
    # (-2 * -1 + -2 * -2 + 1 * -0.5) / 3 = (2 + 4 - 0.5) / 3
    torch.testing.assert_close(loss, torch.tensor(5.5 / 3))
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -2.0], [1.0, 0.0]]) / 3)
    same = L.kl_to_reference(logp.detach(), logp.detach())
    assert torch.equal(same, torch.zeros(2, 2))  # k3 is exactly 0 when the policy equals the reference
