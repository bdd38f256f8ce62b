"""Splitting work across ranks of ``torch.distributed``: item ranges of one index, and
the exact merge of per-shard top-k lists."""

from __future__ import annotations

import torch

from sparcode.kernels.keys import EMPTY_KEY, pack_keys, select_keys

from .index import CodeIndex


def item_range(n_items: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [lo, hi) of the items."""
    return n_items * rank // world, n_items * (rank + 1) // world


def slice_items(index: CodeIndex, lo: int, hi: int) -> CodeIndex:
    """The index restricted to items [lo, hi), renumbered from 0, whose ``item_ids`` are
    the global internal ids: shard results then merge by internal id, the same tie
    order as one process, and map to external ids after the merge."""
    keep = (index.items >= lo) & (index.items < hi)
    codes = torch.repeat_interleave(torch.arange(index.n_codes, device=index.device), index.lengths)
    indptr = torch.zeros(index.n_codes + 1, dtype=torch.int64, device=index.device)
    indptr[1:] = torch.bincount(codes[keep], minlength=index.n_codes).cumsum(0)
    ids = torch.arange(lo, hi, device=index.device)
    return CodeIndex(indptr, (index.items[keep] - lo).to(torch.int32), index.scores[keep].clone(), hi - lo,
                     index.codebooks, ids, index.n_tokens)


def to_internal(lists: list, item_ids: torch.Tensor) -> list[torch.Tensor]:
    """External item ids -> internal ids, dropping unknown ones."""
    order = torch.argsort(item_ids)
    known = item_ids[order]
    out = []
    for items in lists:
        items = torch.as_tensor(items, dtype=torch.int64)
        pos = torch.searchsorted(known, items).clamp(max=known.numel() - 1)
        out.append(order[pos[known[pos] == items]])
    return out


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-shard results (B, shards x k) into the exact top k (score desc, id asc).

    Each shard returns its own top k under the same order, so the global top k is in
    their union; ids must be < 2**31 (internal or external).
    """
    keys = torch.where(ids >= 0, pack_keys(scores, ids.clamp(min=0)), EMPTY_KEY)
    return select_keys(keys, k)
