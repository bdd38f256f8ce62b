"""How a backend splits a batch to stay within the engine's workspace budget."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


class Plan(NamedTuple):
    """Scratch bytes each query needs (a chunk needs their sum), and the backend's path."""

    per_query_bytes: np.ndarray
    regime: str


def chunks(plan: Plan, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive (start, stop) ranges whose cost fits ``budget`` (at least one query each)."""
    costs = plan.per_query_bytes
    # no chunk can hold more queries than the budget over the cheapest query's cost
    longest = max(1, budget // max(1, int(costs.min()))) if costs.size else 1
    start = 0
    while start < costs.size:
        window = costs[start : start + longest]
        need = np.cumsum(window)
        stop = start + max(1, int(np.searchsorted(need, budget, side="right")))
        yield start, stop
        start = stop
