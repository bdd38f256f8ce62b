"""Dense rows behind one survivor counter: the packed dense kernel, beside K2.

``rows`` is the index as a (V, N) matrix (float16, bfloat16 or float32) with NaN where a
code's list lacks the item. One program sums one query's bag of rows (each times the
code's weight) over one tile of BLOCK_N items in bag order (float32; NaN + v = v, so the
first present score starts the sum and absent pairs add nothing) and keeps the items
whose sum is at or above the query's floor, a lower bound of its k-th score. Programs
are launched queries-first: consecutive programs read the same item tile of the rows, so
rows shared by queries come from L2. Each program reserves room for its survivors with
one atomic add on a counter shared by all, and places them with a prefix sum; the
survivors are grouped by query with two sorts and go to ``torch.topk``.
``dense_search.py`` (K2) is the dense regime's kernel; this one is the regime
``dense-packed``, which the GPU check runs beside it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import pack_keys, packed_launch
from .keys import ITEM_BIAS, ITEM_MASK, SurvivorOverflow, select_survivors


@triton.jit
def _dense_keys_kernel(
    rows_ptr, codes_ptr, bag_offsets_ptr, weights_ptr, floor_ptr, keys_ptr, owners_ptr, counter_ptr, n_items, capacity,
    BLOCK_N: tl.constexpr, WEIGHTED: tl.constexpr,
):
    query = tl.program_id(0).to(tl.int64)
    item = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = item < n_items
    total = tl.full([BLOCK_N], float("nan"), dtype=tl.float32)
    for t in range(tl.load(bag_offsets_ptr + query), tl.load(bag_offsets_ptr + query + 1)):
        code = tl.load(codes_ptr + t)
        value = tl.load(rows_ptr + code * n_items + item, mask=inside, other=float("nan")).to(tl.float32)
        if WEIGHTED:
            value = tl.load(weights_ptr + t) * value
        total = tl.where(total != total, value, tl.where(value != value, total, total + value))
    keep = inside & (total >= tl.load(floor_ptr + query))  # False for NaN: not a candidate
    count = tl.sum(keep.to(tl.int64), axis=0)
    base = tl.atomic_add(counter_ptr, count)
    at = base + tl.cumsum(keep.to(tl.int64), axis=0) - 1
    store = keep & (at < capacity)
    tl.store(keys_ptr + at, pack_keys(total, item), mask=store)
    tl.store(owners_ptr + at, query, mask=store)


def dense_keys(rows: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor, weights: torch.Tensor | None,
               floor: torch.Tensor, *, block_n: int = 1024, capacity: int | None = None,
               limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(owners int64, keys int64) of every (query, item) whose summed score is at or above
    the query's ``floor`` (float32, -inf for none), grouped by query in query order and
    sorted by key (best first) within each query. More than ``limit`` survivors raise
    ``SurvivorOverflow``."""
    n_queries = bag_offsets.numel() - 1
    n_items = rows.shape[1]
    empty = torch.empty(0, dtype=torch.int64, device=codes.device)
    if n_queries == 0 or n_items == 0:
        return empty, empty
    capacity = capacity if capacity is not None else min(n_queries * n_items, 4096 + 64 * n_queries)
    grid = (n_queries, triton.cdiv(n_items, block_n))
    codes, floor = codes.contiguous(), floor.to(torch.float32).contiguous()
    return packed_launch(lambda keys, owners, counter, cap: _dense_keys_kernel[grid](
        rows, codes, bag_offsets, weights if weights is not None else floor, floor, keys, owners, counter, n_items, cap,
        BLOCK_N=block_n, WEIGHTED=weights is not None), capacity, codes.device, limit)


def dense_packed_search(rows: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor,
                        weights: torch.Tensor | None, floor: torch.Tensor, ex_offsets: torch.Tensor, ex_items: torch.Tensor,
                        k: int, *, block_n: int = 1024,
                        max_survivors: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores float32, internal ids int64) per query through the packed kernel. ``floor`` must
    bound the (k + excluded)-th score from below (``engine/selection.py::score_floor``).
    A floor far under the k-th score lets up to N items per query survive: when the
    batch's survivors exceed ``max_survivors``, it is searched in parts that fit (a single
    query is searched whole)."""
    n_queries, n_items = bag_offsets.numel() - 1, rows.shape[1]
    try:
        owners, keys = dense_keys(rows, codes, bag_offsets, weights, floor, block_n=block_n,
                                  limit=max_survivors if n_queries > 1 else None)
    except SurvivorOverflow as exc:
        parts = min(n_queries, max(2, -(-exc.found // max_survivors)))
        bounds = [n_queries * i // parts for i in range(parts + 1)]
        found = []
        for a, b in zip(bounds, bounds[1:]):
            lo, hi = int(bag_offsets[a]), int(bag_offsets[b])
            found.append(dense_packed_search(rows, codes[lo:hi], bag_offsets[a : b + 1] - lo,
                                             None if weights is None else weights[lo:hi], floor[a:b],
                                             ex_offsets[a : b + 1] - ex_offsets[a],
                                             ex_items[int(ex_offsets[a]) : int(ex_offsets[b])],
                                             k, block_n=block_n, max_survivors=max_survivors))
        return torch.cat([scores for scores, _ in found]), torch.cat([ids for _, ids in found])
    if ex_items.numel() and keys.numel():
        items = ITEM_BIAS - (keys & ITEM_MASK)
        ex_rows = torch.repeat_interleave(torch.arange(n_queries, device=codes.device), ex_offsets.diff())
        kept = ~torch.isin(owners * n_items + items, ex_rows * n_items + ex_items[: ex_rows.numel()])
        owners, keys = owners[kept], keys[kept]
    return select_survivors(owners, keys, n_queries, k)
