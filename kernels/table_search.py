"""Table regime (K1): each query's candidates summed in its own open-addressing table.

Persistent programs each own one table of TABLE slots in global memory (item ids int32,
-1 for empty, and float32 sums), sized so that every table in flight fits in L2. For a
query the program clears its table, then walks the bag's posting lists in bag order,
CHUNK postings at a time: each posting finds its item's slot by linear probing,
claiming an empty slot with ``tl.atomic_cas`` (lanes of one chunk hold distinct items,
since items are distinct within a list, so they never claim the same slot for two
items), and adds its weighted score to the slot's sum. A barrier between chunks keeps
the additions in bag order, so sums equal the other backends' bit for bit. Then one
pass over the table keeps the items that are not excluded and reach the query's floor,
and merges them CHUNK at a time into the query's best KPAD keys (sorted on chip). Work
is the query's postings plus two passes over its table: no binary search per posting
and no cost per code of the bag, which is what long bags (item codes) need.

A query fits when its postings (an upper bound of its distinct items) are at most
half the table, so probes stay short and the table never fills; ``fits`` says which
queries do. k must be at most ``MAX_K``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import empty_keys, lower_bound, pack_keys, search_steps
from .keys import unpack_keys

MAX_K = 1024  # the best keys a program keeps on chip
LOAD = 0.5  # postings per table slot at most: probes stay short, the table never fills
_EMPTY_SLOT = tl.constexpr(-1)
_NO_MATCH = tl.constexpr(-2)  # a compare value no slot holds: atomic_cas leaves the slot alone


@triton.jit
def _top_of(keys, ROWS: tl.constexpr, KPAD: tl.constexpr):
    """The first KPAD of a descending-sorted vector of ROWS x KPAD keys."""
    grid = tl.reshape(keys, (ROWS, KPAD))
    row = tl.arange(0, ROWS)[:, None]
    return tl.max(tl.where(row == 0, grid, empty_keys(grid)), axis=0)


@triton.jit
def _table_kernel(
    indptr_ptr, items_ptr, scores_ptr, codes_ptr, bag_offsets_ptr, weights_ptr, ex_offsets_ptr, ex_items_ptr,
    floor_ptr, queries_ptr, n_queries, slot_items_ptr, slot_sums_ptr, out_ptr, k,
    TABLE: tl.constexpr, CHUNK: tl.constexpr, KPAD: tl.constexpr, EX_STEPS: tl.constexpr, WEIGHTED: tl.constexpr,
):
    pid = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    my_items = slot_items_ptr + pid.to(tl.int64) * TABLE
    my_sums = slot_sums_ptr + pid.to(tl.int64) * TABLE
    for i in range(pid, n_queries, tl.num_programs(0)):
        query = tl.load(queries_ptr + i).to(tl.int64)
        for clear in range(0, TABLE, CHUNK):
            tl.store(my_items + clear + lanes, tl.full([CHUNK], -1, dtype=tl.int32))
            tl.store(my_sums + clear + lanes, tl.zeros([CHUNK], dtype=tl.float32))
        tl.debug_barrier()
        for t in range(tl.load(bag_offsets_ptr + query), tl.load(bag_offsets_ptr + query + 1)):
            code = tl.load(codes_ptr + t)
            lo = tl.load(indptr_ptr + code)
            hi = tl.load(indptr_ptr + code + 1)
            for start in range(lo, hi, CHUNK):
                at = start + lanes
                valid = at < hi
                item = tl.load(items_ptr + at, mask=valid, other=0)
                value = tl.load(scores_ptr + at, mask=valid, other=0.0).to(tl.float32)
                if WEIGHTED:
                    value = tl.load(weights_ptr + t) * value
                # Fibonacci hashing spreads neighbouring ids; linear probing from there
                slot = ((item.to(tl.int64) * 2654435769) >> 12) & (TABLE - 1)
                todo = valid
                while tl.max(todo.to(tl.int32), axis=0) > 0:
                    seen = tl.atomic_cas(my_items + slot, tl.where(todo, _EMPTY_SLOT, _NO_MATCH), item)
                    todo = todo & (seen != _EMPTY_SLOT) & (seen != item)
                    slot = tl.where(todo, (slot + 1) & (TABLE - 1), slot)
                current = tl.load(my_sums + slot, mask=valid, other=0.0)
                tl.store(my_sums + slot, current + value, mask=valid)
                tl.debug_barrier()
        ex_lo = tl.zeros([CHUNK], dtype=tl.int64) + tl.load(ex_offsets_ptr + query)
        ex_hi = tl.zeros([CHUNK], dtype=tl.int64) + tl.load(ex_offsets_ptr + query + 1)
        floor = tl.load(floor_ptr + query)
        best = empty_keys(tl.arange(0, KPAD))
        for chunk in range(0, TABLE, CHUNK):
            item = tl.load(my_items + chunk + lanes)
            total = tl.load(my_sums + chunk + lanes)
            occupied = item >= 0
            pos = lower_bound(ex_items_ptr, ex_lo, ex_hi, item.to(tl.int64), EX_STEPS)
            inside = occupied & (pos < ex_hi)
            excluded = inside & (tl.load(ex_items_ptr + pos, mask=inside, other=-1) == item.to(tl.int64))
            keep = occupied & ~excluded & (total >= floor)
            keys = tl.sort(tl.where(keep, pack_keys(total, item), empty_keys(item)), 0, descending=True)
            merged = tl.reshape(tl.join(best, _top_of(keys, CHUNK // KPAD, KPAD)), (2 * KPAD,))
            best = _top_of(tl.sort(merged, 0, descending=True), 2, KPAD)
        kept = tl.arange(0, KPAD)
        tl.store(out_ptr + i * k + kept, best, mask=kept < k)
        tl.debug_barrier()


def fits(postings: torch.Tensor, table: int) -> torch.Tensor:
    """(B,) bool: the queries whose ``postings`` a table of ``table`` slots takes."""
    return postings <= int(table * LOAD)


def table_keys(
    indptr: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor,
    weights: torch.Tensor | None, ex_offsets: torch.Tensor, ex_items: torch.Tensor, floor: torch.Tensor,
    queries: torch.Tensor, k: int, *, table: int = 16384, chunk: int = 256, n_programs: int | None = None,
) -> torch.Tensor:
    """(len(queries), k) keys: the best k of each listed query (``queries`` int64 ids into
    the bags, each of which must ``fits``), best first, ``EMPTY_KEY``-padded; candidates
    under the query's ``floor`` (float32, -inf for none) or excluded are left out.

    ``codes`` (nnz,) int64 with ``bag_offsets`` (B+1) and optional float32 ``weights``
    are the bags; ``ex_offsets`` (B+1) and ``ex_items`` int64 the sorted exclusions.
    ``table`` and ``chunk`` are powers of two (the chunk is cut to the table and grown to
    hold k); ``n_programs`` tables are in flight."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k: the table regime keeps at most {MAX_K} results, got {k}")
    if table < 2 or table & (table - 1) or chunk < 2 or chunk & (chunk - 1):
        raise ValueError(f"table and chunk: expected powers of two >= 2, got {table}, {chunk}")
    kpad = max(2, triton.next_power_of_2(k))
    chunk = max(min(chunk, table), kpad)  # a chunk fits the table and holds the best k
    table = max(table, chunk)
    n_queries = queries.numel()
    out = torch.empty((n_queries, k), dtype=torch.int64, device=codes.device)
    if n_queries == 0:
        return out
    if n_programs is None:
        n_programs = 4 * torch.cuda.get_device_properties(codes.device).multi_processor_count if codes.is_cuda else 4
    n_programs = min(n_programs, n_queries)
    slot_items = torch.empty((n_programs, table), dtype=torch.int32, device=codes.device)
    slot_sums = torch.empty((n_programs, table), dtype=torch.float32, device=codes.device)
    most_excluded = int((ex_offsets[1:] - ex_offsets[:-1]).max()) if ex_offsets.numel() > 1 else 0
    _table_kernel[(n_programs,)](
        indptr, items, scores, codes, bag_offsets, weights if weights is not None else slot_sums, ex_offsets, ex_items,
        floor.to(torch.float32).contiguous(), queries.contiguous(), n_queries, slot_items, slot_sums, out, k,
        TABLE=table, CHUNK=chunk, KPAD=kpad, EX_STEPS=search_steps(most_excluded), WEIGHTED=weights is not None,
    )
    return out


def table_search(
    indptr: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor,
    weights: torch.Tensor | None, ex_offsets: torch.Tensor, ex_items: torch.Tensor, floor: torch.Tensor,
    queries: torch.Tensor, k: int, *, table: int = 16384, chunk: int = 256, n_programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores float32, internal ids int64) of each listed query, table regime."""
    return unpack_keys(table_keys(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, floor,
                                  queries, k, table=table, chunk=chunk, n_programs=n_programs))
