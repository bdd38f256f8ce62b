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
from sparcode.kernels import candidate_search, dense_search, table_search, tiled_search
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
        elif regime == "dense":
            rows = dense_rows(index, index.scores.dtype)
            floor, rest = timed(lambda: score_floor(index, bags, torch.full((bags.n_queries,), k, device=index.device)),
                                 device)
            found, kernel = timed(lambda f=floor: dense_search.dense_keys(rows, *flat, f, block_n=tile_items), device)
            _, selection = timed(lambda o=found[0], kk=found[1]: select_survivors(o, kk, bags.n_queries, k), device)
            survivors = found[1].numel()
        else:
            raise ValueError(f"regime: expected table, candidate, tiled or dense, got {regime!r}")
        for name, value in (("rest", rest), ("kernel", kernel), ("selection", selection)):
            phases[name].append(value)
    out = {name: statistics.median(values[1:]) for name, values in phases.items()}
    if survivors is not None:  # the table regime selects inside its kernel: nothing is handed over
        out["keys_per_query"] = survivors / max(1, bags.n_queries)
    return out

