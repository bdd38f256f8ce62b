"""What every backend's selection shares: the exclusion layout, and the score floor that
drops candidates which provably cannot reach a query's top k before any key is packed."""

from __future__ import annotations

import torch

from sparcode.kernels.keys import ITEM_BIAS, ITEM_MASK, SCORE_SHIFT, ordered_to_score, score_to_ordered

from .bags import Bags
from .index import CodeIndex

Exclusion = tuple[torch.Tensor, torch.Tensor] | None
"""Per-query excluded items as CSR (offsets (B + 1) int64, internal item ids int64,
sorted within each query), or None."""

SORT_BLOCK = 1 << 24  # postings sorted at a time: the keys cost 5 x 8 bytes per posting in flight


def descending_scores(index: CodeIndex) -> torch.Tensor:
    """Each posting list's scores in the index's dtype, sorted from high to low (a derived
    layout; the values are the index's own, so float16 holds them exactly at half the
    bytes of float32). Whole lists are sorted a block of about ``SORT_BLOCK`` postings at
    a time: at once, a 671M-posting index (Gowalla, every pair kept) needed 27 GB of keys
    and sort output."""
    out = torch.empty(index.nnz, dtype=index.scores.dtype, device=index.device)
    targets = torch.tensor(range(SORT_BLOCK, index.nnz, SORT_BLOCK), dtype=torch.int64, device=index.device)
    cuts = torch.searchsorted(index.indptr, targets)  # the first code starting at or past each target
    edges = torch.unique(torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), index.n_codes)])).tolist()
    for first, last in zip(edges[:-1], edges[1:]):
        lo, hi = int(index.indptr[first]), int(index.indptr[last])
        lengths = index.lengths[first:last]
        codes = torch.repeat_interleave(torch.arange(last - first, device=index.device), lengths)
        low = ITEM_BIAS - score_to_ordered(index.scores[lo:hi]).to(torch.int64)  # in [0, 2**32)
        keys = torch.sort((codes << SCORE_SHIFT) | low).values
        out[lo:hi] = ordered_to_score((ITEM_BIAS - (keys & ITEM_MASK)).to(torch.int32)).to(out.dtype)
    return out


def score_floor(index: CodeIndex, bags: Bags, rank: torch.Tensor) -> torch.Tensor:
    """A lower bound on each query's ``rank``-th best summed score (-inf when unknown).

    With only positive stored scores and no negative weight, an item's sum is at least
    its weighted score in any one of the query's lists (each term is >= 0 and float32
    rounding is monotone), so the ``rank``-th best weighted score of the query's best
    list bounds the ``rank``-th best sum from below. Candidates under the bound cannot
    reach the top k; ``rank`` counts the query's excluded items too, since they may be
    among that list's best. A query with a negative weight gets -inf. Cost: one lookup
    per code of the batch.
    """
    n_queries = bags.n_queries
    floor = torch.full((n_queries,), float("-inf"), device=bags.codes.device)
    if index.nnz == 0 or bags.codes.numel() == 0 or not all_positive(index):
        return floor
    desc = index.derived("descending_scores", descending_scores)
    owner = bags.query_of()
    rank = rank.to(torch.int64)[owner]
    present = index.lengths[bags.codes] >= rank
    at = (index.indptr[bags.codes] + rank - 1).clamp(max=index.nnz - 1)
    bounds = desc[at].float()
    if bags.weights is not None:
        bounds = bags.weights * bounds
    bounds = torch.where(present, bounds, float("-inf"))
    floor = floor.scatter_reduce(0, owner, bounds, reduce="amax")
    return torch.where(bags.nonnegative_weights(), floor, float("-inf"))


def all_positive(index: CodeIndex) -> bool:
    """Whether every stored score is > 0 (cached per index): the score floor needs it."""
    return index.derived("scores_positive", lambda ix: bool((ix.scores > 0).all()))
