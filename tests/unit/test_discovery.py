"""Early-discovery masks (subnet/discovery.py), snapshot step choice and the report's summary, on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from opdlab.errors import UserError
from opdlab.recipes.mask_discovery import discovery_steps
from opdlab.report.claims_experiments import mask_discovery_summary
from opdlab.subnet.discovery import lowest_magnitude_like, match_density, overlap_with


def _mask(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_match_density_keeps_counts_subsets_a_larger_mask_and_fills_a_smaller_one():
    like = {"a": _mask([1, 1, 0, 0, 0, 0]), "b": _mask([1, 1, 1, 1, 0, 0])}
    found = {"a": _mask([1, 1, 1, 1, 0, 0]), "b": _mask([0, 0, 0, 0, 0, 1])}
    out = match_density(found, like, seed=3)
    assert [int(out[k].sum()) for k in "ab"] == [2, 4]
    assert not (out["a"] & ~found["a"]).any()          # a subset of the larger early mask
    assert bool(out["b"][5]) and int(out["b"].sum()) == 4  # the smaller one is kept whole, then filled
    assert torch.equal(out["a"], match_density(found, like, seed=3)["a"])  # seeded


def test_match_density_names_a_missing_or_misshaped_tensor():
    with pytest.raises(UserError, match="'b' is missing"):
        match_density({"a": _mask([1])}, {"a": _mask([1]), "b": _mask([0])})
    with pytest.raises(UserError, match="'a': 2 coordinates"):
        match_density({"a": _mask([1, 0])}, {"a": _mask([1, 0, 0])})


def test_lowest_magnitude_like_picks_the_smallest_absolute_source_weights(tmp_path):
    save_file({"w": torch.tensor([[0.5, -0.01, 2.0], [0.02, -3.0, 0.001]])}, str(tmp_path / "model.safetensors"))
    out = lowest_magnitude_like(tmp_path / "model.safetensors", {"w": _mask([1, 1, 1, 0, 0, 0]).view(2, 3)})
    assert out["w"].tolist() == [[False, True, False], [True, False, True]]
    with pytest.raises(UserError, match="'x' is not in the source"):
        lowest_magnitude_like(tmp_path / "model.safetensors", {"x": _mask([1])})


def test_overlap_with_by_hand():
    final = {"a": _mask([1, 1, 0, 0]), "b": _mask([1, 0, 0, 0, 0, 0, 0, 0])}
    arm = {"a": _mask([1, 0, 1, 0]), "b": _mask([1, 1, 0, 0, 0, 0, 0, 0])}
    overlap, chance = overlap_with(arm, final)
    assert overlap == pytest.approx(2 / 4)                       # 1 of 2 in a, 1 of 2 in b
    assert chance == pytest.approx((2 * 0.5 + 2 * 0.125) / 4)    # density of final, per tensor
    assert all(math.isnan(x) for x in overlap_with({"a": _mask([0, 0, 0, 0])}, final))


def test_discovery_steps_take_the_first_snapshot_at_or_after_each_fraction():
    snaps = {2: None, 4: None, 6: None, 8: None, 10: None}
    assert discovery_steps(snaps, [0.1, 0.25, 0.5], 10) == [2, 4, 6]
    assert discovery_steps(snaps, [0.5, 0.55], 10) == [6]        # no repeats
    assert discovery_steps({10: None}, [0.5], 10) == []           # the last step is the final arm, not early


def _md(full_kl: float, arms: dict[str, float], se: float = 0.01) -> dict:
    row = lambda kl, cost: {"reverse_kl": kl, "reverse_kl_se": se, "cost_steps": cost}  # noqa: E731
    return {"num_eval": 64, "steps": 10, "source": {"reverse_kl": 1.0, "reverse_kl_se": se},
            "full": {"reverse_kl": full_kl, "reverse_kl_se": se},
            "arms": {k: row(v, int(k[5:]) if k.startswith("step-") else (10 if k == "final" else 0))
                     for k, v in arms.items()}}


def test_summary_names_the_cheapest_early_mask_that_recovers_the_full_run():
    out = mask_discovery_summary(_md(0.5, {"step-5": 0.52, "step-2": 0.54, "source": 0.8, "final": 0.51,
                                           "random": 0.9}))
    rec = {r["arm"]: r["recovery"] for r in out["arms"]}
    assert [r["arm"] for r in out["arms"]] == ["step-2", "step-5", "source", "final", "random"]
    assert rec["step-2"] == pytest.approx(0.92) and rec["random"] == pytest.approx(0.2)
    assert out["cheapest_recovering_arm"] == "step-2" and "after 2 of 10 steps" in out["statement"]


def test_summary_says_plainly_when_no_early_mask_recovers_or_the_gain_is_noise():
    out = mask_discovery_summary(_md(0.5, {"step-2": 0.7, "source": 0.8, "final": 0.52, "random": 0.75}))
    assert out["cheapest_recovering_arm"] is None and out["statement"].startswith("No early or source-only mask")
    assert "Neither did the final mask" not in out["statement"]  # the final mask recovers 96 %
    # the final mask itself recovers only 10 %: the statement says no mask of that density trains well
    weak = mask_discovery_summary(_md(0.5, {"step-2": 0.96, "final": 0.95, "random": 0.96}))
    assert weak["cheapest_recovering_arm"] is None and "Neither did the final mask" in weak["statement"]
    # an early mask at 92 % but the random mask at 86 %: not enough above chance
    out = mask_discovery_summary(_md(0.5, {"step-2": 0.54, "random": 0.57}))
    assert out["cheapest_recovering_arm"] is None
    noise = mask_discovery_summary(_md(0.99, {"step-2": 0.99, "random": 1.0}, se=0.05))
    assert noise["statement"].startswith("Early discovery cannot be judged")
    assert mask_discovery_summary(None) is None


def test_paired_se_by_hand_and_its_fallback():
    from opdlab.report.verdicts import difference_se, paired_se

    a = {"per_example": {"correct": [1.0, 0.0, 1.0, 1.0], "reverse_kl_sum": [2.0, 4.0, 2.0, 4.0],
                         "reverse_kl_tokens": [2.0, 2.0, 2.0, 2.0]}, "reverse_kl_se": 0.5}
    b = {"per_example": {"correct": [1.0, 0.0, 0.0, 1.0], "reverse_kl_sum": [1.0, 3.0, 1.0, 3.0],
                         "reverse_kl_tokens": [2.0, 2.0, 2.0, 2.0]}, "reverse_kl_se": 0.5}
    # accuracy: differences 0, 0, 1, 0 (mean 0.25) -> sd of the paired differences / sqrt(4)
    d = [0.0, 0.0, 1.0, 0.0]
    want = math.sqrt(sum((x - 0.25) ** 2 for x in d) / (4 * 3))
    assert paired_se(a, b, "accuracy") == pytest.approx(want)
    # reverse KL: every prompt drops by exactly 0.5 per token -> no spread, paired SE 0 (unpaired 0.71)
    assert paired_se(a, b, "reverse_kl") == pytest.approx(0.0)
    assert difference_se(a, b, "reverse_kl", 4) == pytest.approx(0.0)
    unpaired = {"reverse_kl_se": 0.5}
    assert paired_se(a, unpaired, "reverse_kl") is None
    assert difference_se(a, unpaired, "reverse_kl", 4) == pytest.approx(math.sqrt(0.5))
    short = {"per_example": {"correct": [1.0, 0.0]}}
    assert paired_se(a, short, "accuracy") is None  # different prompts: no pairing
    start = {"per_example_start": b["per_example"]}
    assert paired_se(a, start, "accuracy", "", "_start") == pytest.approx(want)
