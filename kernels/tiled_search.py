"""Tiled regime: item-blocked accumulation when a query touches a large share of N.

Persistent programs walk (query, item block) work items. For one block of BLOCK_N
items, each of the query's lists is cut to the block with two binary searches, and
its postings (times the code's weight) are added in bag order into a BLOCK_N float32 scratch row that belongs
to the program (global memory, but only n_programs x BLOCK_N of it: it stays in L2).
Items of one posting list are distinct, so a chunk of one list has no conflicting
writes; a barrier separates chunks. -inf marks "no posting yet", so only items present
in some list become candidates. Excluded items are reset to -inf. The block's keys are
sorted on chip and its best ``kb`` are written out: (B, n_blocks x kb) keys in all,
never B x N; ``torch.topk`` over them gives the exact top k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import empty_keys, lower_bound, pack_keys, search_steps
from .keys import select_keys


@triton.jit
def _tiled_keys_kernel(
    indptr_ptr, items_ptr, scores_ptr, codes_ptr, bag_offsets_ptr, weights_ptr, ex_offsets_ptr, ex_items_ptr,
    scratch_ptr, out_ptr, n_items, n_blocks, n_work, kb,
    STEPS: tl.constexpr, EX_STEPS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, WEIGHTED: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK_N)
    chunk = tl.arange(0, CHUNK)
    row = scratch_ptr + pid.to(tl.int64) * BLOCK_N
    for work in range(pid, n_work, n_programs):
        query = (work // n_blocks).to(tl.int64)
        block = (work % n_blocks).to(tl.int64)
        base = block * BLOCK_N
        tl.store(row + lanes, tl.full([BLOCK_N], float("-inf"), dtype=tl.float32))
        tl.debug_barrier()
        for t in range(tl.load(bag_offsets_ptr + query), tl.load(bag_offsets_ptr + query + 1)):
            code = tl.load(codes_ptr + t)
            lo = tl.load(indptr_ptr + code)
            hi = tl.load(indptr_ptr + code + 1)
            seg_lo = lower_bound(items_ptr, lo, hi, base, STEPS)
            seg_hi = lower_bound(items_ptr, seg_lo, hi, base + BLOCK_N, STEPS)
            for c in range(seg_lo, seg_hi, CHUNK):
                at = c + chunk
                m = at < seg_hi
                slot = tl.load(items_ptr + at, mask=m, other=0).to(tl.int64) - base
                score = tl.load(scores_ptr + at, mask=m, other=0.0).to(tl.float32)
                if WEIGHTED:
                    score = tl.load(weights_ptr + t) * score
                current = tl.load(row + slot, mask=m, other=0.0)
                tl.store(row + slot, tl.where(current == float("-inf"), score, current + score), mask=m)
                tl.debug_barrier()
        ex_lo = lower_bound(ex_items_ptr, tl.load(ex_offsets_ptr + query), tl.load(ex_offsets_ptr + query + 1), base, EX_STEPS)
        ex_hi = lower_bound(ex_items_ptr, ex_lo, tl.load(ex_offsets_ptr + query + 1), base + BLOCK_N, EX_STEPS)
        for c in range(ex_lo, ex_hi, CHUNK):
            at = c + chunk
            m = at < ex_hi
            slot = tl.load(ex_items_ptr + at, mask=m, other=0) - base
            tl.store(row + slot, tl.full([CHUNK], float("-inf"), dtype=tl.float32), mask=m)
        tl.debug_barrier()
        total = tl.load(row + lanes)
        item = base + lanes
        present = (total != float("-inf")) & (item < n_items)
        keys = tl.where(present, pack_keys(total, item), empty_keys(item))
        best = tl.sort(keys, 0, descending=True)
        tl.store(out_ptr + query * n_blocks * kb + block * kb + lanes, best, mask=lanes < kb)
        tl.debug_barrier()


def tiled_keys(
    indptr: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor,
    weights: torch.Tensor | None, ex_offsets: torch.Tensor, ex_items: torch.Tensor, n_items: int, kb: int,
    *, block_n: int = 1024, chunk: int = 128, n_programs: int | None = None,
) -> torch.Tensor:
    """(B, n_blocks * kb) keys: for each block of ``block_n`` items, its ``kb`` best
    keys (sorted, ``EMPTY_KEY``-padded). ``kb`` <= ``block_n``. The bags are flat
    ``codes`` with ``bag_offsets`` (B+1) and optional float32 ``weights``."""
    n_queries = bag_offsets.numel() - 1
    n_blocks = triton.cdiv(n_items, block_n)
    kb = min(kb, block_n)
    out = torch.empty((n_queries, n_blocks * kb), dtype=torch.int64, device=codes.device)
    n_work = n_queries * n_blocks
    if n_work == 0:
        return out
    if n_programs is None:
        n_programs = 8 * torch.cuda.get_device_properties(codes.device).multi_processor_count if codes.is_cuda else 4
    n_programs = min(n_programs, n_work)
    scratch = torch.empty((n_programs, block_n), dtype=torch.float32, device=codes.device)
    longest = int((indptr[1:] - indptr[:-1]).max())
    most_excluded = int((ex_offsets[1:] - ex_offsets[:-1]).max())
    _tiled_keys_kernel[(n_programs,)](
        indptr, items, scores, codes.contiguous(), bag_offsets, weights if weights is not None else out,
        ex_offsets, ex_items, scratch, out, n_items, n_blocks, n_work, kb,
        STEPS=search_steps(longest), EX_STEPS=search_steps(most_excluded), BLOCK_N=block_n, CHUNK=chunk,
        WEIGHTED=weights is not None,
    )
    return out


def tiled_search(
    indptr: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, codes: torch.Tensor, bag_offsets: torch.Tensor,
    weights: torch.Tensor | None, ex_offsets: torch.Tensor, ex_items: torch.Tensor, k: int, n_items: int, *,
    block_n: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores float32, internal ids int64) per query, tiled regime."""
    return select_keys(tiled_keys(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, n_items, k,
                                  block_n=block_n), k)
