"""Packed selection keys: one int64 per (score, item) that orders results exactly.

The high 32 bits hold the float32 score mapped to an order-preserving int32, the low 32
bits hold ``2**31 - 1 - item``. A larger key therefore means a higher score, and among
equal scores the lower item id. Keys of distinct items are distinct, so any top-k over
keys (``torch.topk``, a sort, a Triton bitonic sort) gives one deterministic answer.
``EMPTY_KEY`` (int64 min) marks "no candidate" and decodes to id -1, score -inf.
"""

from __future__ import annotations

import torch

SCORE_SHIFT = 32  # the ordered score sits in the high 32 bits
ITEM_MASK = 2**32 - 1  # the low 32 bits: ITEM_BIAS - item
ITEM_BIAS = 2**31 - 1  # the largest item id a key holds
MAGNITUDE_MASK = 0x7FFFFFFF  # float32 bits other than the sign: flipped for negative scores
EMPTY_KEY = -(2**63)


def score_to_ordered(scores: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 with the same order (-0.0 is folded onto +0.0)."""
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & MAGNITUDE_MASK)


def ordered_to_score(ordered: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`score_to_ordered`."""
    ordered = ordered.to(torch.int32)
    return (ordered ^ ((ordered >> 31) & MAGNITUDE_MASK)).view(torch.float32)


def pack_keys(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Pack float scores and item ids (< 2**31) into int64 selection keys."""
    high = score_to_ordered(scores).to(torch.int64) << SCORE_SHIFT
    return high | (ITEM_BIAS - items.to(torch.int64))


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys -> (scores float32, ids int64); ``EMPTY_KEY`` gives (-inf, -1)."""
    empty = keys == EMPTY_KEY
    scores = ordered_to_score((keys >> SCORE_SHIFT).to(torch.int32))
    ids = ITEM_BIAS - (keys & ITEM_MASK)
    scores = scores.masked_fill(empty, float("-inf"))
    ids = ids.masked_fill(empty, -1)
    return scores, ids


def select_keys(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of a (B, W) key matrix, padded to k columns: (scores, ids)."""
    rows, width = keys.shape
    take = min(k, width)
    if take > 0:
        top = torch.topk(keys, take, dim=1, largest=True, sorted=True).values
    else:
        top = keys.new_empty((rows, 0))
    if take < k:
        pad = keys.new_full((rows, k - take), EMPTY_KEY)
        top = torch.cat([top, pad], dim=1)
    return unpack_keys(top)


def row_topk(crow: torch.Tensor, values: torch.Tensor, k: int, fill: float | int) -> torch.Tensor:
    """The k largest values of each CSR row (ragged rows), sorted, padded with ``fill``.

    Rows are grouped by length rounded up to a power of two and each group is padded
    to its width, so padding at most doubles the work even when a few rows are far
    longer than the rest (a single (B, longest row) matrix can be 100x the data).
    """
    n_rows = crow.numel() - 1
    lengths = crow.diff()
    top = torch.full((n_rows, k), fill, dtype=values.dtype, device=values.device)
    if values.numel() == 0:
        return top
    groups = torch.ceil(torch.log2(lengths.clamp(min=1).to(torch.float64))).to(torch.int64)
    for group in torch.unique(groups).tolist():
        rows = torch.nonzero(groups == group).squeeze(1)
        width = 1 << group
        pos = torch.arange(width, device=values.device)
        gather = (crow[rows].unsqueeze(1) + pos).clamp(max=values.numel() - 1)
        matrix = torch.where(pos < lengths[rows].unsqueeze(1), values[gather], fill)
        part = min(k, width)
        top[rows, :part] = torch.topk(matrix, part, dim=1, largest=True, sorted=True).values
    return top


def select_row_keys(crow: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each ragged CSR row of keys: (scores (B, k), ids (B, k))."""
    return unpack_keys(row_topk(crow, keys, k, EMPTY_KEY))


class SurvivorOverflow(RuntimeError):
    """A launch found more survivors than its caller allows in memory: search fewer
    queries at a time."""

    def __init__(self, found: int, limit: int) -> None:
        super().__init__(f"{found} survivors, over the limit of {limit}")
        self.found = found


def group_survivors(owners: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner, key) pairs grouped by owner in owner order, best key first within each."""
    order = torch.argsort(keys, descending=True, stable=True)
    order = order[torch.argsort(owners[order], stable=True)]
    return owners[order], keys[order]


def select_survivors(owners: torch.Tensor, keys: torch.Tensor, n_queries: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of (owner query, key) pairs per query: (scores (B, k), ids (B, k))."""
    crow = torch.zeros(n_queries + 1, dtype=torch.int64, device=keys.device)
    crow[1:] = torch.bincount(owners, minlength=n_queries).cumsum(0)
    return select_row_keys(crow, keys, k)
