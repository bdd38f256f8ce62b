"""Plain torch references for every kernel op, with the same signatures.

They take the queries as bags (flat ``codes``, ``bag_offsets`` (B+1), optional float32
``weights``) and build a dense float32 accumulator per query (fine for a reference, never
for the kernels) in bag order, so sums are bit-identical to the kernels' and the key
matrices can be compared with ``torch.equal``.
"""

from __future__ import annotations

import torch

from .keys import EMPTY_KEY, ITEM_BIAS, ITEM_MASK, SurvivorOverflow, pack_keys, select_keys, unpack_keys


def _bag(codes, bag_offsets, weights, q):
    """Query q's codes and weights (1 without weights) as Python lists."""
    lo, hi = int(bag_offsets[q]), int(bag_offsets[q + 1])
    bag = codes[lo:hi].tolist()
    return bag, [1.0] * len(bag) if weights is None else weights[lo:hi].tolist()


def _query_sums(indptr, items, scores, codes, bag_offsets, weights, q, n_items):
    """Query q's dense sums in bag order (each score times its code's weight), presence,
    and the first code holding each item."""
    total = torch.zeros(n_items, dtype=torch.float32, device=items.device)
    present = torch.zeros(n_items, dtype=torch.bool, device=items.device)
    first = torch.full((n_items,), -1, dtype=torch.int64, device=items.device)
    lists = []
    for t, (code, weight) in enumerate(zip(*_bag(codes, bag_offsets, weights, q))):
        lo, hi = int(indptr[code]), int(indptr[code + 1])
        its = items[lo:hi].to(torch.int64)
        value = scores[lo:hi].to(torch.float32)
        if weights is not None:
            value = torch.tensor(weight, dtype=torch.float32) * value
        total[its] += value
        fresh = its[first[its] < 0]
        first[fresh] = t
        present[its] = True
        lists.append((t, its))
    return total, present, first, lists


def candidate_keys(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, offsets, *, block=128,
                   skip=None):
    """Reference for ``candidate_search.candidate_keys``."""
    n_items = int(items.max()) + 1 if items.numel() else 1
    out = torch.full((int(offsets[-1]),), EMPTY_KEY, dtype=torch.int64, device=codes.device)
    for q in range(bag_offsets.numel() - 1):
        total, _, first, lists = _query_sums(indptr, items, scores, codes, bag_offsets, weights, q, n_items)
        excluded = set(ex_items[int(ex_offsets[q]) : int(ex_offsets[q + 1])].tolist())
        pos = int(offsets[q])
        for t, its in lists:
            keep = first[its] == t
            if excluded:
                keep &= torch.tensor([i not in excluded for i in its.tolist()], dtype=torch.bool, device=its.device)
            out[pos : pos + its.numel()] = torch.where(keep, pack_keys(total[its], its), EMPTY_KEY)
            pos += its.numel()
    return out


def query_offsets(indptr, codes, bag_offsets):
    """Reference for ``candidate_search.query_offsets``."""
    lengths = [sum(int(indptr[c + 1] - indptr[c]) for c in _bag(codes, bag_offsets, None, q)[0])
               for q in range(bag_offsets.numel() - 1)]
    return torch.tensor([0] + lengths, dtype=torch.int64, device=codes.device).cumsum(0)


def candidate_survivors(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, offsets, floor, *,
                        block=128, capacity=None, skip=None):
    """Reference for ``candidate_search.candidate_survivors``."""
    keys = candidate_keys(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, offsets)
    per_query = []
    for q in range(bag_offsets.numel() - 1):
        mine = keys[int(offsets[q]) : int(offsets[q + 1])]
        per_query.append(mine[(mine != EMPTY_KEY) & (unpack_keys(mine)[0] >= floor[q])])
    return _grouped(per_query, codes.device)


def candidate_search(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, k, floor=None, skip=None):
    """Reference for ``candidate_search.candidate_search``: a dense per-query sort (a valid
    ``floor`` and the ``skip`` table change nothing, so they are ignored)."""
    n_items = int(items.max()) + 1 if items.numel() else 1
    n_queries = bag_offsets.numel() - 1
    out = torch.full((n_queries, k), EMPTY_KEY, dtype=torch.int64, device=codes.device)
    for q in range(n_queries):
        total, present, _, _ = _query_sums(indptr, items, scores, codes, bag_offsets, weights, q, n_items)
        excluded = ex_items[int(ex_offsets[q]) : int(ex_offsets[q + 1])]
        present[excluded[excluded < n_items]] = False
        ids = torch.nonzero(present).squeeze(1)
        best = torch.sort(pack_keys(total[ids], ids), descending=True).values[:k]
        out[q, : best.numel()] = best
    return unpack_keys(out)


def tiled_keys(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, n_items, kb, *, block_n=1024,
               chunk=128, n_programs=None):
    """Reference for ``tiled_search.tiled_keys``."""
    n_queries = bag_offsets.numel() - 1
    n_blocks = -(-n_items // block_n)
    kb = min(kb, block_n)
    out = torch.empty((n_queries, n_blocks * kb), dtype=torch.int64, device=codes.device)
    for q in range(n_queries):
        total, present, _, _ = _query_sums(indptr, items, scores, codes, bag_offsets, weights, q, n_items)
        present[ex_items[int(ex_offsets[q]) : int(ex_offsets[q + 1])]] = False
        keys = torch.full((n_blocks * block_n,), EMPTY_KEY, dtype=torch.int64, device=codes.device)
        ids = torch.arange(n_items, device=codes.device)
        keys[:n_items] = torch.where(present, pack_keys(total, ids), EMPTY_KEY)
        best = torch.sort(keys.view(n_blocks, block_n), dim=1, descending=True).values[:, :kb]
        out[q] = best.reshape(-1)
    return out


def tiled_search(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, k, n_items, *, block_n=1024):
    """Reference for ``tiled_search.tiled_search``."""
    return select_keys(tiled_keys(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, n_items, k,
                                  block_n=block_n), k)


def _row_sums(rows, codes, bag_offsets, weights, q):
    """Query q's sums over the dense rows in bag order, NaN where no list holds the item."""
    total = torch.full((rows.shape[1],), float("nan"), dtype=torch.float32, device=rows.device)
    for code, weight in zip(*_bag(codes, bag_offsets, weights, q)):
        value = rows[code].to(torch.float32)
        if weights is not None:
            value = torch.tensor(weight, dtype=torch.float32) * value
        total = torch.where(torch.isnan(total), value, torch.where(torch.isnan(value), total, total + value))
    return total


def dense_keys(rows, codes, bag_offsets, weights, floor, *, block_n=1024, capacity=None, limit=None):
    """Reference for ``dense_packed.dense_keys``."""
    per_query = []
    for q in range(bag_offsets.numel() - 1):
        total = _row_sums(rows, codes, bag_offsets, weights, q)
        ids = torch.nonzero(total >= floor[q]).squeeze(1)
        per_query.append(pack_keys(total[ids], ids))
    found = sum(int(mine.numel()) for mine in per_query)
    if limit is not None and found > limit:
        raise SurvivorOverflow(found, limit)
    return _grouped(per_query, codes.device)


def dense_floor(rows, codes, bag_offsets, weights, floor, ranks, order, *, block_q=16, block_n=1024, group=4):
    """Reference for ``dense_search.dense_floor``: the ranks-th best sum over the tiles
    ``dense_search.sample_tiles`` picks (the kernel's choice of tiles, not its sums)."""
    from .dense_search import sample_tiles

    n_items = rows.shape[1]
    tiles = sample_tiles(-(-n_items // block_n), int(ranks.max()), order.numel(), block_n)
    sampled = (tiles.unsqueeze(1) * block_n + torch.arange(block_n)).reshape(-1)
    sampled = sampled[sampled < n_items].to(rows.device)
    raised = floor.clone().to(torch.float32)
    for q in range(bag_offsets.numel() - 1):
        sums = _row_sums(rows, codes, bag_offsets, weights, q)[sampled]
        sums = torch.sort(torch.where(torch.isnan(sums), float("-inf"), sums), descending=True).values
        rank = int(ranks[q])
        if rank <= sums.numel():
            raised[q] = max(float(raised[q]), float(sums[rank - 1]))
    return raised, -(-n_items // block_n) / tiles.numel()


def dense_buckets(rows, codes, bag_offsets, weights, floor, order, width, *, block_q=16, block_n=1024, group=4):
    """Reference for ``dense_search.dense_buckets``, its rows sorted best first and unfilled
    slots ``EMPTY_KEY`` (the kernel leaves them unwritten and in no order)."""
    keys = torch.full((order.numel(), max(1, width)), EMPTY_KEY, dtype=torch.int64, device=codes.device)
    counts = torch.zeros(order.numel(), dtype=torch.int64, device=codes.device)
    for r, q in enumerate(order.tolist()):
        total = _row_sums(rows, codes, bag_offsets, weights, q)
        ids = torch.nonzero(total >= floor[q]).squeeze(1)
        mine = torch.sort(pack_keys(total[ids], ids), descending=True).values
        counts[r] = mine.numel()
        keys[r, : min(width, mine.numel())] = mine[:width]
    return keys, counts


def _grouped(per_query, device):
    """(owners, keys): each query's keys, best first, in query order."""
    if not per_query:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty
    keys = [torch.sort(mine, descending=True).values for mine in per_query]
    owners = [torch.full_like(mine, q) for q, mine in enumerate(keys)]
    return torch.cat(owners), torch.cat(keys)


def dense_search(rows, codes, bag_offsets, weights, floor, ex_offsets, ex_items, k, *, block_n=1024, block_q=16,
                 group=4, max_survivors=None):
    """Reference for ``dense_search.dense_search`` and ``dense_packed.dense_packed_search``:
    a dense per-query sort (one query at a time, so the tiling and ``max_survivors``
    change nothing)."""
    n_queries = bag_offsets.numel() - 1
    out = torch.full((n_queries, k), EMPTY_KEY, dtype=torch.int64, device=codes.device)
    owners, keys = dense_keys(rows, codes, bag_offsets, weights, floor)
    for q in range(n_queries):
        mine = keys[owners == q]
        excluded = ex_items[int(ex_offsets[q]) : int(ex_offsets[q + 1])]
        ids = ITEM_BIAS - (mine & ITEM_MASK)
        mine = mine[~torch.isin(ids, excluded)][:k]
        out[q, : mine.numel()] = mine
    return unpack_keys(out)


def dense_packed_search(rows, codes, bag_offsets, weights, floor, ex_offsets, ex_items, k, *, block_n=1024,
                        max_survivors=None):
    """Reference for ``dense_packed.dense_packed_search``."""
    return dense_search(rows, codes, bag_offsets, weights, floor, ex_offsets, ex_items, k)


def table_keys(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, floor, queries, k, *,
               table=16384, chunk=256, n_programs=None):
    """Reference for ``table_search.table_keys``: a dense per-query sort of the candidates
    that reach the floor and are not excluded."""
    n_items = int(items.max()) + 1 if items.numel() else 1
    out = torch.full((queries.numel(), k), EMPTY_KEY, dtype=torch.int64, device=codes.device)
    for row, q in enumerate(queries.tolist()):
        total, present, _, _ = _query_sums(indptr, items, scores, codes, bag_offsets, weights, q, n_items)
        excluded = ex_items[int(ex_offsets[q]) : int(ex_offsets[q + 1])]
        present[excluded[excluded < n_items]] = False
        present &= total >= floor[q]
        ids = torch.nonzero(present).squeeze(1)
        best = torch.sort(pack_keys(total[ids], ids), descending=True).values[:k]
        out[row, : best.numel()] = best
    return out


def table_search(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, floor, queries, k, *,
                 table=16384, chunk=256, n_programs=None):
    """Reference for ``table_search.table_search``."""
    return unpack_keys(table_keys(indptr, items, scores, codes, bag_offsets, weights, ex_offsets, ex_items, floor,
                                  queries, k))
