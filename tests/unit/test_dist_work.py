"""Sharing tensors out across ranks: every item exactly once, balanced, the same on every rank."""

import pytest

from opdlab.dist.work import balanced_shares


def test_every_item_once_in_order_and_balanced():
    costs = [100.0, 1.0, 1.0, 50.0, 49.0, 3.0, 2.0, 1.0]
    shares = balanced_shares(costs, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    assert all(s == sorted(s) for s in shares)
    loads = [sum(costs[i] for i in s) for s in shares]
    assert sorted(loads) == [103.0, 104.0]  # 100 + 2 + 1 + 1 and 50 + 49 + 3 + 1
    assert shares == balanced_shares(list(costs), 2)  # deterministic


def test_one_rank_takes_all_and_idle_ranks_get_nothing():
    assert balanced_shares([3.0, 1.0], 1) == [[0, 1]]
    assert balanced_shares([3.0, 1.0], 4) == [[0], [1], [], []]
    with pytest.raises(ValueError):
        balanced_shares([1.0], 0)
