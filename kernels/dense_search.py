"""K2, the dense regime: blocks of queries summed over item tiles of the dense score rows,
a floor raised by a sample of tiles, survivors in per-query buckets.

``rows`` is the index as a (V, N) matrix (float16, bfloat16 or float32) with NaN where a
code's list lacks the item. One program sums BLOCK_Q queries' bags over one tile of
BLOCK_N items: at step t it gathers the t-th row of every query of the block in one 2-D
load (BLOCK_Q row loads issued together) and adds each times its code's weight, in bag
order (float32; NaN + v = v, so the first present score starts a sum and absent pairs
add nothing), which gives every backend's sums bit for bit. Queries go to blocks in
order of bag length, so a block runs as long as its longest bag, not the batch's.
Programs walk the tiles in groups of GROUP: consecutive programs take the group's tiles
for one block of queries, then the next block, so the rows of the tiles in flight stay
in L2.

The same kernel runs twice. The sample pass sums a few evenly spaced tiles and writes
the sums; the ``rank``-th best sum of a query's sample (``rank``: k plus its excluded
items) is at most its ``rank``-th best over all items, so it is a floor that really
filters (about rank x tiles / sampled tiles survivors), exact because the second pass
computes the same sums with the same code. The filtering pass keeps each (query, item)
at or above the query's floor in the query's own bucket: per-query int64 counters, one
atomic add per query and program, places by prefix sum, nothing stored past the bucket
(a full bucket still counts, so the query is searched again with room for all).
Selection is one ``torch.topk`` over the (B, bucket) keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import new_counters, pack_keys
from .keys import EMPTY_KEY, ITEM_BIAS, ITEM_MASK, select_keys

BLOCK_Q = 16  # queries summed together by one program
GROUP_TILES = 4  # item tiles a run of consecutive programs shares
SAMPLE_SHARE = 16  # the sample pass sums at least one tile in this many
SAMPLE_DEPTH = 4  # ... and at least this many items per rank the floor is read at
SAMPLE_BYTES = 2**30  # the sampled sums of one search at most
BUCKET_SLACK = 2  # bucket slots per expected survivor
NUM_WARPS = 8  # 16 x 1,024 float32 sums: 64 per thread


# one compiled kernel for both passes (no argument specialised by value): the same sums
@triton.jit(do_not_specialize=["n_queries", "n_tiles", "width", "sampling"])
def _k2_kernel(
    rows_ptr, codes_ptr, bag_offsets_ptr, weights_ptr, floor_ptr, order_ptr, n_queries, tiles_ptr, n_tiles, n_items,
    sums_ptr, keys_ptr, counts_ptr, width, sampling,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, WEIGHTED: tl.constexpr,
):
    # grouped order: GROUP tiles for one block of queries, then the same tiles for the next
    pid = tl.program_id(0).to(tl.int64)
    per_group = GROUP * tl.cdiv(n_queries, BLOCK_Q)
    first = (pid // per_group) * GROUP
    span = tl.minimum(n_tiles - first, GROUP)
    slot = first + (pid % per_group) % span
    block = (pid % per_group) // span
    row = block * BLOCK_Q + tl.arange(0, BLOCK_Q)  # the block's rows of the output
    real = row < n_queries
    query = tl.load(order_ptr + row, mask=real, other=0)
    start = tl.load(bag_offsets_ptr + query, mask=real, other=0)
    length = tl.load(bag_offsets_ptr + query + 1, mask=real, other=0) - start
    col = tl.arange(0, BLOCK_N)
    item = tl.load(tiles_ptr + slot).to(tl.int64) * BLOCK_N + col
    inside = item < n_items
    total = tl.full([BLOCK_Q, BLOCK_N], float("nan"), dtype=tl.float32)
    for t in range(0, tl.max(length, axis=0)):
        active = t < length
        code = tl.load(codes_ptr + start + t, mask=active, other=0)
        value = tl.load(rows_ptr + code[:, None] * n_items + item[None, :], mask=active[:, None] & inside[None, :],
                        other=float("nan")).to(tl.float32)
        if WEIGHTED:
            value = tl.load(weights_ptr + start + t, mask=active, other=1.0)[:, None] * value
        total = tl.where(total != total, value, tl.where(value != value, total, total + value))
    if sampling != 0:  # the sample pass: every sum of the tile, -inf for absent
        at = row[:, None] * width + slot * BLOCK_N + col[None, :]
        tl.store(sums_ptr + at, tl.where(total != total, float("-inf"), total), mask=real[:, None])
    else:
        floor = tl.load(floor_ptr + query, mask=real, other=float("inf"))
        keep = real[:, None] & inside[None, :] & (total >= floor[:, None])  # False for NaN: not a candidate
        base = tl.atomic_add(counts_ptr + row, tl.sum(keep.to(tl.int64), axis=1), mask=real)
        at = base[:, None] + tl.cumsum(keep.to(tl.int64), axis=1) - 1
        store = keep & (at < width)
        tl.store(keys_ptr + row[:, None] * width + at, pack_keys(total, item[None, :]), mask=store)


def _launch(rows: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor, weights: torch.Tensor | None,
            floor: torch.Tensor, order: torch.Tensor, tiles: torch.Tensor, sums: torch.Tensor, keys: torch.Tensor,
            counts: torch.Tensor, width: int, sampling: bool, block_q: int, block_n: int, group: int) -> None:
    """The sample pass (into ``sums``) or the filtering pass (into ``keys`` and ``counts``)."""
    grid = (triton.cdiv(order.numel(), block_q) * tiles.numel(),)
    _k2_kernel[grid](rows, codes, bag_offsets, weights if weights is not None else floor, floor, order, order.numel(),
                     tiles, tiles.numel(), rows.shape[1], sums, keys, counts, width, int(sampling),
                     BLOCK_Q=block_q, BLOCK_N=block_n, GROUP=group, WEIGHTED=weights is not None,
                     num_warps=NUM_WARPS)


def sample_tiles(n_tiles: int, depth: int, n_queries: int, block_n: int) -> torch.Tensor:
    """Evenly spaced tile numbers for the sample pass: one in ``SAMPLE_SHARE`` and room for
    ``SAMPLE_DEPTH`` items per rank, within ``SAMPLE_BYTES`` of sums (at least one tile)."""
    wanted = max(-(-n_tiles // SAMPLE_SHARE), -(-SAMPLE_DEPTH * depth // block_n))
    room = max(1, SAMPLE_BYTES // (4 * block_n * max(1, n_queries)))
    count = min(n_tiles, wanted, room)
    return torch.arange(count, dtype=torch.int64) * n_tiles // count


def scratch_bytes(n_items: int, k: int, block_n: int) -> int:
    """A query's scratch memory in a K2 search without exclusions: its sampled sums (4
    bytes each) and its bucket (the key, its item and the exclusion test: 24 bytes a
    slot), as ``dense_search`` sizes them."""
    n_tiles = -(-n_items // block_n)
    sampled = sample_tiles(n_tiles, k, 1, block_n).numel()
    return 4 * sampled * block_n + 24 * bucket_width(k, n_tiles / sampled, n_items)


def bucket_width(rank: int, spread: float, n_items: int) -> int:
    """Bucket slots per query: BUCKET_SLACK x the survivors a floor read at ``rank`` of a
    sample ``spread`` times smaller than the catalogue lets through, a power of two
    (at least 16, at most N)."""
    return min(n_items, 1 << max(4, int(BUCKET_SLACK * rank * spread - 1).bit_length()))


def rank_floor(sums: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Each row's ``ranks``-th best of ``sums`` (-inf where the row has fewer): a lower bound
    of that rank over any superset of the row's items."""
    depth = min(sums.shape[1], int(ranks.max())) if ranks.numel() else 0
    if depth == 0:
        return torch.full((sums.shape[0],), float("-inf"), device=sums.device)
    top = torch.topk(sums, depth, dim=1).values
    picked = top.gather(1, (ranks.clamp(1, depth) - 1).unsqueeze(1)).squeeze(1)
    return torch.where(ranks <= depth, picked, float("-inf"))


def dense_floor(rows: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor, weights: torch.Tensor | None,
                floor: torch.Tensor, ranks: torch.Tensor, order: torch.Tensor, *, block_q: int = BLOCK_Q,
                block_n: int = 1024, group: int = GROUP_TILES) -> tuple[torch.Tensor, float]:
    """(floor, tiles / sampled tiles): each query's ``floor`` raised to the ``ranks``-th best
    sum of the sample pass's tiles; the ratio scales the expected survivors."""
    n_queries, n_tiles = order.numel(), triton.cdiv(rows.shape[1], block_n)
    tiles = sample_tiles(n_tiles, int(ranks.max()), n_queries, block_n).to(codes.device)
    width = tiles.numel() * block_n
    sums = torch.empty((n_queries, width), dtype=torch.float32, device=codes.device)
    unused = torch.zeros(1, dtype=torch.int64, device=codes.device)
    _launch(rows, codes, bag_offsets, weights, floor, order, tiles, sums, unused, unused, width, True, block_q, block_n, group)
    raised = floor.clone()
    raised[order] = torch.maximum(floor[order], rank_floor(sums, ranks[order]))
    return raised, n_tiles / tiles.numel()


def dense_buckets(rows: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor, weights: torch.Tensor | None,
                  floor: torch.Tensor, order: torch.Tensor, width: int, *, block_q: int = BLOCK_Q, block_n: int = 1024,
                  group: int = GROUP_TILES) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys (len(order), width) int64, counts (len(order),) int64): row r holds the keys
    of query ``order[r]``'s items at or above its floor, in no order, in its first
    min(count, width) slots (the rest unwritten); count is all it found."""
    n_tiles = triton.cdiv(rows.shape[1], block_n)
    keys = torch.empty((order.numel(), max(1, width)), dtype=torch.int64, device=codes.device)
    counts = new_counters(order.numel(), codes.device)
    tiles = torch.arange(n_tiles, dtype=torch.int64, device=codes.device)
    unused = torch.zeros(1, dtype=torch.float32, device=codes.device)
    _launch(rows, codes, bag_offsets, weights, floor, order, tiles, unused, keys, counts, width, False, block_q, block_n, group)
    return keys, counts


def select_buckets(keys: torch.Tensor, counts: torch.Tensor, queries: torch.Tensor, ex_offsets: torch.Tensor,
                   ex_items: torch.Tensor, n_items: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, ids) of each bucket row (of query ``queries[r]``), the query's
    excluded items left out; every row's count must fit its bucket."""
    filled = torch.arange(keys.shape[1], device=keys.device) < counts.unsqueeze(1)
    keys = torch.where(filled, keys, EMPTY_KEY)
    excluded = int(ex_offsets[-1])
    if excluded:
        owners = torch.repeat_interleave(torch.arange(ex_offsets.numel() - 1, device=keys.device), ex_offsets.diff())
        items = ITEM_BIAS - (keys & ITEM_MASK)
        hit = torch.isin(queries.unsqueeze(1) * n_items + items, owners * n_items + ex_items[:excluded])
        keys = torch.where(hit & filled, EMPTY_KEY, keys)
    return select_keys(keys, k)


def dense_search(rows: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor, weights: torch.Tensor | None,
                 floor: torch.Tensor, ex_offsets: torch.Tensor, ex_items: torch.Tensor, k: int, *, block_n: int = 1024,
                 block_q: int = BLOCK_Q, group: int = GROUP_TILES,
                 max_survivors: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores float32, internal ids int64) per query through K2. ``floor`` must
    bound the (k + excluded)-th score from below (-inf for none); the sample pass raises
    it. Buckets hold BUCKET_SLACK x the expected survivors; queries that find more are
    searched again with room for all. ``max_survivors`` bounds the bucket slots of one
    launch (a single query is searched whole). Host reads: the deepest rank, and
    whether a bucket overflowed."""
    n_queries, n_items = bag_offsets.numel() - 1, rows.shape[1]
    scores = torch.full((n_queries, k), float("-inf"), device=codes.device)
    ids = torch.full((n_queries, k), -1, dtype=torch.int64, device=codes.device)
    if n_queries == 0 or n_items == 0 or k == 0:
        return scores, ids
    codes, floor = codes.contiguous(), floor.to(torch.float32).contiguous()
    ranks = k + ex_offsets.diff()
    order = torch.argsort(bag_offsets.diff(), stable=True)  # blocks of queries with bags of like length
    options = {"block_q": block_q, "block_n": block_n, "group": group}
    floor, spread = dense_floor(rows, codes, bag_offsets, weights, floor, ranks, order, **options)
    todo, width = order, bucket_width(int(ranks.max()), spread, n_items)
    while todo.numel():  # a second round, if any, has room for the most any of its queries found
        step = todo.numel() if max_survivors is None else max(1, max_survivors // width)
        over, most = [], 0
        for part in torch.split(todo, step):
            keys, counts = dense_buckets(rows, codes, bag_offsets, weights, floor, part, width, **options)
            scores[part], ids[part] = select_buckets(keys, counts, part, ex_offsets, ex_items, n_items, k)
            over.append(part[counts > width])
            if over[-1].numel():
                most = max(most, int(counts.max()))
        todo, width = torch.cat(over), most
    return scores, ids
