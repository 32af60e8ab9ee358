"""Independent work items shared out across ranks (analysis: one tensor pair per item).

    shares = balanced_shares([cost(t) for t in items], world_size)
    mine = [items[i] for i in shares[rank]]

Greedy longest-processing-time: items by decreasing cost, each to the rank with the least
work so far (ties to the lower rank). Deterministic, so every rank computes the same split
without talking; within a share the items keep their original order.
"""

from __future__ import annotations


def balanced_shares(costs: list[float], world_size: int) -> list[list[int]]:
    """Item indices per rank (each list ascending); every index appears in exactly one share."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0.0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(i)
        load[rank] += costs[i]
    return [sorted(s) for s in shares]
