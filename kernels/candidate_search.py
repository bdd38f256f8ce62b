"""Candidate regime: per query, every posting of its bag's lists becomes at most one candidate.

One program handles BLOCK consecutive positions of one query's concatenated posting
lists. For each position (item i of list t) it binary-searches i in all the bag's lists,
summing the (weighted) scores it finds in bag order (float32), and keeps the position
only if t is the first list holding i (so each item is counted once; a repeated code
adds its score twice). Excluded items are binary-searched in the query's sorted exclusion list.
The keys (``keys.py``) order results exactly; a ragged per-query ``torch.topk``
(``keys.select_row_keys``) gives the top k.
The output is flat and ragged: query q's keys sit at ``offsets[q]:offsets[q+1]``
(its posting count), so a query that touches one huge popular list costs only its own
postings, not the batch's. Programs are laid out by a block table (query, block) over
exactly the non-empty blocks. Nothing of size B x N or B x T_max exists: work and memory follow the bags' postings.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import empty_keys, lower_bound, pack_keys, packed_launch, search_steps
from .keys import select_row_keys, select_survivors

SKIP_SHIFT = 14  # superblocks of 2**14 items: 62 entries per list at N = 10**6 (16 MB at V = 65,536)


class SkipTable(NamedTuple):
    """``positions[c, j]``: the first position in list c whose item is >= j * 2**shift
    ((V, n_super + 1) int64, the last column the list's end), and the binary-search
    steps that settle the longest superblock segment."""

    positions: torch.Tensor
    shift: int
    steps: int


def skip_table(indptr: torch.Tensor, items: torch.Tensor, n_items: int, shift: int = SKIP_SHIFT) -> SkipTable:
    """The skip table of a CSR (items strictly increasing within each list)."""
    n_codes = indptr.numel() - 1
    n_super = max(1, (n_items + (1 << shift) - 1) >> shift)
    code_of = torch.repeat_interleave(torch.arange(n_codes, device=indptr.device), indptr.diff())
    key = code_of * (n_super + 1) + (items.to(torch.int64) >> shift)  # sorted: by code, then item
    positions = torch.searchsorted(key, torch.arange(n_codes * (n_super + 1), device=indptr.device))
    positions = positions.view(n_codes, n_super + 1)
    longest = int(positions.diff(dim=1).max()) if items.numel() else 0
    return SkipTable(positions, shift, search_steps(longest))


@triton.jit
def _candidate_keys_kernel(
    indptr_ptr, items_ptr, scores_ptr, codes_ptr, bag_offsets_ptr, weights_ptr, ex_offsets_ptr, ex_items_ptr, offsets_ptr,
    block_query_ptr, block_index_ptr, out_ptr,
    floor_ptr, owners_ptr, counter_ptr, capacity, skip_ptr, n_super,
    STEPS: tl.constexpr, EX_STEPS: tl.constexpr, BLOCK: tl.constexpr, FILTER: tl.constexpr,
    SKIP: tl.constexpr, SHIFT: tl.constexpr, WEIGHTED: tl.constexpr,
):
    pid = tl.program_id(0)
    query = tl.load(block_query_ptr + pid).to(tl.int64)
    pos = tl.load(block_index_ptr + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    bag_lo = tl.load(bag_offsets_ptr + query)
    bag_hi = tl.load(bag_offsets_ptr + query + 1)

    # which list (token) and which posting each position is
    start = tl.zeros([BLOCK], dtype=tl.int64)
    src = tl.zeros([BLOCK], dtype=tl.int64)
    token = tl.zeros([BLOCK], dtype=tl.int64)
    for t in range(bag_lo, bag_hi):
        code = tl.load(codes_ptr + t)
        lo = tl.load(indptr_ptr + code)
        length = tl.load(indptr_ptr + code + 1) - lo
        here = (pos >= start) & (pos < start + length)
        src = tl.where(here, lo + pos - start, src)
        token = tl.where(here, t, token)
        start += length
    valid = pos < start
    item = tl.load(items_ptr + src, mask=valid, other=0)

    # sum over all T lists in token order; the first list holding the item owns it
    total = tl.zeros([BLOCK], dtype=tl.float32)
    owner = tl.full([BLOCK], 9223372036854775807, dtype=tl.int64)
    for t in range(bag_lo, bag_hi):
        code = tl.load(codes_ptr + t)
        lo = tl.load(indptr_ptr + code)
        hi = tl.load(indptr_ptr + code + 1)
        if SKIP:  # the skip table narrows the search to the item's superblock of the list
            entry = code * (n_super + 1) + (item.to(tl.int64) >> SHIFT)
            seg_lo = tl.load(skip_ptr + entry, mask=valid, other=0)
            seg_hi = tl.load(skip_ptr + entry + 1, mask=valid, other=0)
        else:
            seg_lo = tl.zeros([BLOCK], dtype=tl.int64) + lo
            seg_hi = tl.zeros([BLOCK], dtype=tl.int64) + hi
        at = lower_bound(items_ptr, seg_lo, seg_hi, item, STEPS)
        inside = valid & (at < seg_hi)
        found = inside & (tl.load(items_ptr + at, mask=inside, other=-1) == item)
        value = tl.load(scores_ptr + at, mask=found, other=0.0).to(tl.float32)
        if WEIGHTED:
            value = tl.load(weights_ptr + t) * value
        total += tl.where(found, value, 0.0)
        owner = tl.where(found & (owner > t), t, owner)
    keep = valid & (owner == token)

    ex_lo = tl.load(ex_offsets_ptr + query)
    ex_hi = tl.load(ex_offsets_ptr + query + 1)
    at = lower_bound(ex_items_ptr, tl.zeros([BLOCK], dtype=tl.int64) + ex_lo, tl.zeros([BLOCK], dtype=tl.int64) + ex_hi,
                     item.to(tl.int64), EX_STEPS)
    inside = keep & (at < ex_hi)
    excluded = inside & (tl.load(ex_items_ptr + at, mask=inside, other=-1) == item.to(tl.int64))
    keep = keep & ~excluded

    if FILTER:  # only what reaches the query's floor, packed: one atomic add reserves the room
        keep = keep & (total >= tl.load(floor_ptr + query))
        base = tl.atomic_add(counter_ptr, tl.sum(keep.to(tl.int64), axis=0))
        at = base + tl.cumsum(keep.to(tl.int64), axis=0) - 1
        store = keep & (at < capacity)
        tl.store(out_ptr + at, pack_keys(total, item), mask=store)
        tl.store(owners_ptr + at, query, mask=store)
    else:
        keys = tl.where(keep, pack_keys(total, item), empty_keys(pos))
        tl.store(out_ptr + tl.load(offsets_ptr + query) + pos, keys, mask=valid)


def query_offsets(indptr: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor) -> torch.Tensor:
    """(B+1) int64 offsets of each query's postings in the flat key layout: a segment sum
    over the bags' codes (``codes`` flat, query q's at ``bag_offsets[q]:bag_offsets[q+1]``)."""
    per_code = torch.zeros(codes.numel() + 1, dtype=torch.int64, device=codes.device)
    per_code[1:] = (indptr[codes + 1] - indptr[codes]).cumsum(0)
    return per_code[bag_offsets] - per_code[bag_offsets[0]]


def candidate_keys(
    indptr: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor,
    weights: torch.Tensor | None, ex_offsets: torch.Tensor, ex_items: torch.Tensor, offsets: torch.Tensor, *,
    block: int = 128, skip: SkipTable | None = None,
) -> torch.Tensor:
    """Flat keys, one per posting of each query's concatenated lists (query q at
    ``offsets[q]:offsets[q+1]``, from :func:`query_offsets`): the posting's key if it
    owns its item and the item is not excluded, else ``EMPTY_KEY``.

    ``codes`` (nnz,) int64 with ``bag_offsets`` (B+1) int64 and optional float32
    ``weights`` (nnz,) are the queries' bags; ``ex_offsets`` (B+1) int64 and ``ex_items``
    int64 hold each query's excluded items, sorted within each query.
    """
    total = int(offsets[-1])
    out = torch.empty(total, dtype=torch.int64, device=codes.device)
    if total == 0:
        return out
    _launch(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, offsets, out, block, None, out,
            None, 0, skip)
    return out


def candidate_survivors(
    indptr: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor,
    weights: torch.Tensor | None, ex_offsets: torch.Tensor, ex_items: torch.Tensor, offsets: torch.Tensor,
    floor: torch.Tensor, *, block: int = 128, capacity: int | None = None, skip: SkipTable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(owners int64, keys int64) of the candidates whose sum reaches their query's
    ``floor`` (float32, -inf for none) and are not excluded, grouped by query in query
    order and sorted by key (best first) within each query."""
    n_queries = bag_offsets.numel() - 1
    empty = torch.empty(0, dtype=torch.int64, device=codes.device)
    if int(offsets[-1]) == 0:
        return empty, empty
    capacity = capacity if capacity is not None else 4096 + 64 * n_queries
    floor = floor.to(torch.float32).contiguous()
    return packed_launch(lambda keys, owners, counter, cap: _launch(
        indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, offsets, keys, block, floor, owners,
        counter, cap, skip), capacity, codes.device)


def _launch(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, offsets, out, block, floor, owners,
            counter, capacity, skip=None):
    """One program per (query, block of its postings) over exactly the non-empty blocks;
    with ``floor`` the survivors are packed, else every posting gets its slot; with
    ``skip`` each search covers one superblock segment instead of the whole list."""
    n_queries = bag_offsets.numel() - 1
    blocks = (offsets.diff() + block - 1) // block
    block_query = torch.repeat_interleave(torch.arange(n_queries, device=codes.device), blocks)
    first_block = blocks.cumsum(0) - blocks
    block_index = torch.arange(block_query.numel(), device=codes.device) - first_block[block_query]
    steps = skip.steps if skip is not None else search_steps(int((indptr[1:] - indptr[:-1]).max()))
    most_excluded = int((ex_offsets[1:] - ex_offsets[:-1]).max())
    filtered = floor is not None
    _candidate_keys_kernel[(block_query.numel(),)](
        indptr, items, scores, codes.contiguous(), bag_offsets, weights if weights is not None else out,
        ex_offsets, ex_items, offsets, block_query.to(torch.int32), block_index.to(torch.int32), out,
        floor if filtered else out, owners, counter if filtered else out, capacity,
        skip.positions if skip is not None else out, skip.positions.shape[1] - 1 if skip is not None else 0,
        STEPS=steps, EX_STEPS=search_steps(most_excluded), BLOCK=block, FILTER=filtered,
        SKIP=skip is not None, SHIFT=skip.shift if skip is not None else 0, WEIGHTED=weights is not None,
    )


def candidate_search(
    indptr: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor,
    weights: torch.Tensor | None, ex_offsets: torch.Tensor, ex_items: torch.Tensor, k: int,
    floor: torch.Tensor | None = None, skip: SkipTable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores float32, internal ids int64) per query, candidate regime. With
    ``floor``, a lower bound of each query's (k + excluded)-th score
    (``engine/selection.py::score_floor``), only the candidates that reach it are written
    and selected: hundreds of keys per query instead of every posting."""
    offsets = query_offsets(indptr, codes, bag_offsets)
    n_queries = bag_offsets.numel() - 1
    if floor is None:
        return select_row_keys(offsets, candidate_keys(indptr, items, scores, codes, bag_offsets, weights, ex_offsets,
                                                       ex_items, offsets, skip=skip), k)
    owners, keys = candidate_survivors(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, offsets,
                                       floor, skip=skip)
    return select_survivors(owners, keys, n_queries, k)
