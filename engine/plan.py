"""How a backend splits a batch to stay within the engine's workspace budget."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


class Plan(NamedTuple):
    """Scratch bytes each query needs; ``padded``: a chunk costs its row count times its
    largest query (a rectangular buffer), else the sum; ``regime``: the backend's path."""

    per_query_bytes: np.ndarray
    padded: bool
    regime: str


def chunks(plan: Plan, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive (start, stop) ranges whose cost fits ``budget`` (at least one query each)."""
    costs = plan.per_query_bytes
    start = 0
    while start < costs.size:
        window = costs[start : start + max(1, budget // max(1, int(costs.min(initial=1))))]
        if plan.padded:
            need = np.arange(1, window.size + 1) * np.maximum.accumulate(window)
        else:
            need = np.cumsum(window)
        stop = start + max(1, int(np.searchsorted(need, budget, side="right")))
        yield start, stop
        start = stop
