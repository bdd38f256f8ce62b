"""Where one Triton search spends its time: the kernel, the selection, and the rest
(planning, the score floor, exclusion handling), each timed with device synchronisation,
and how many keys per query the kernel hands to the selection."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from sparcode.engine import CodeIndex
from sparcode.engine.bags import Bags
from sparcode.engine.dense import dense_rows
from sparcode.engine.selection import score_floor
from sparcode.engine.triton_backend import table_size
from sparcode.kernels import candidate_search, dense_packed, dense_search, table_search, tiled_search
from sparcode.kernels.keys import select_keys, select_survivors


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """fn()'s result and its seconds, the device synchronized around it."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def breakdown(index: CodeIndex, codes: torch.Tensor | Bags, k: int, regime: str, *, tile_items: int = 1024,
              repeats: int = 3) -> dict[str, float]:
    """Median seconds of each phase of one search of ``codes`` ((B, T) or bags) in
    ``regime``; every query must fit the table in the table regime."""
    device = index.device.type
    bags = codes if isinstance(codes, Bags) else Bags.dense(codes)
    flat = (bags.codes, bags.offsets, bags.weights)
    ex_offsets = torch.zeros(bags.n_queries + 1, dtype=torch.int64, device=index.device)
    ex_items = torch.zeros(1, dtype=torch.int64, device=index.device)
    phases: dict[str, list[float]] = {"rest": [], "kernel": [], "selection": []}
    survivors = None  # keys handed to selection per query (the candidate and dense regimes' floor survivors)
    out_width = None  # K2's bucket slots per query
    for _ in range(repeats + 1):  # the first run compiles and builds derived layouts
        if regime == "candidate":
            (offsets, floor), rest = timed(lambda: (candidate_search.query_offsets(index.indptr, *flat[:2]), score_floor(
                index, bags, torch.full((bags.n_queries,), k, device=index.device))), device)
            skip = index.derived(("skip_table", candidate_search.SKIP_SHIFT),
                                 lambda ix: candidate_search.skip_table(ix.indptr, ix.items, ix.n_items))
            found, kernel = timed(lambda o=offsets, f=floor, s=skip: candidate_search.candidate_survivors(
                index.indptr, index.items, index.scores, *flat, ex_offsets, ex_items, o, f, skip=s), device)
            _, selection = timed(lambda o=found[0], kk=found[1]: select_survivors(o, kk, bags.n_queries, k), device)
            survivors = found[1].numel()
        elif regime == "tiled":
            rest = 0.0
            keys, kernel = timed(lambda: tiled_search.tiled_keys(
                index.indptr, index.items, index.scores, *flat, ex_offsets, ex_items, index.n_items, k,
                block_n=tile_items), device)
            _, selection = timed(lambda kk=keys: select_keys(kk, k), device)
            survivors = keys.numel()
        elif regime == "table":  # selection runs inside the kernel
            (floor, queries), rest = timed(lambda: (score_floor(index, bags, torch.full(
                (bags.n_queries,), k, device=index.device)), torch.arange(bags.n_queries, device=index.device)), device)
            table = table_size(bags.postings(index.lengths))
            _, kernel = timed(lambda f=floor, q=queries: table_search.table_keys(
                index.indptr, index.items, index.scores, *flat, ex_offsets, ex_items, f, q, k, table=table), device)
            selection = 0.0
        elif regime == "dense":  # K2: the sample pass and the filtering pass are the kernel
            rows = dense_rows(index, index.scores.dtype)
            ranks = torch.full((bags.n_queries,), k, device=index.device)
            (floor, order), rest = timed(lambda r=ranks: (score_floor(index, bags, r), torch.argsort(
                bags.offsets.diff(), stable=True)), device)
            (buckets, counts, width), kernel = timed(lambda f=floor, o=order, r=ranks: _k2_passes(
                rows, flat, f, r, o, k, tile_items), device)
            _, selection = timed(lambda b=buckets, c=counts, o=order: dense_search.select_buckets(
                b, c, o, ex_offsets, ex_items, index.n_items, k), device)
            survivors = int(counts.sum())
            out_width = width
        elif regime == "dense-packed":
            rows = dense_rows(index, index.scores.dtype)
            floor, rest = timed(lambda: score_floor(index, bags, torch.full((bags.n_queries,), k, device=index.device)),
                                 device)
            found, kernel = timed(lambda f=floor: dense_packed.dense_keys(rows, *flat, f, block_n=tile_items), device)
            _, selection = timed(lambda o=found[0], kk=found[1]: select_survivors(o, kk, bags.n_queries, k), device)
            survivors = found[1].numel()
        else:
            raise ValueError(f"regime: expected table, candidate, tiled, dense or dense-packed, got {regime!r}")
        for name, value in (("rest", rest), ("kernel", kernel), ("selection", selection)):
            phases[name].append(value)
    out = {name: statistics.median(values[1:]) for name, values in phases.items()}
    if survivors is not None:  # the table regime selects inside its kernel: nothing is handed over
        out["keys_per_query"] = survivors / max(1, bags.n_queries)
    if out_width is not None:
        out["bucket_width"] = out_width
    return out


def _k2_passes(rows: torch.Tensor, flat: tuple, floor: torch.Tensor, ranks: torch.Tensor, order: torch.Tensor, k: int,
               tile_items: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """K2's two passes as ``dense_search.dense_search`` sizes them: the sample pass, then
    the filtering pass into buckets wide enough for every query (a second launch if one
    overflows). Returns (buckets, counts, width)."""
    raised, spread = dense_search.dense_floor(rows, *flat, floor, ranks, order, block_n=tile_items)
    width = dense_search.bucket_width(k, spread, rows.shape[1])
    buckets, counts = dense_search.dense_buckets(rows, *flat, raised, order, width, block_n=tile_items)
    if int(counts.max()) > width:
        width = int(counts.max())
        buckets, counts = dense_search.dense_buckets(rows, *flat, raised, order, width, block_n=tile_items)
    return buckets, counts, width

