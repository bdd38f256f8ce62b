"""Item codes for any catalogue: EASE's B fitted one column at a time over each item's
nearest neighbours, with no N x N matrix anywhere.

Column i of EASE's B (``item_codes``: B = argmin ||X - XB||^2 + l2 ||B||^2, diag(B) = 0)
is the ridge regression of item i's column of X on every other item's column,
B[:, i] = (G_-i,-i + l2 I)^-1 G_-i,i, with G = X^T X. Restricting the regressors to i's M
nearest items S_i (``neighbours``: most co-occurring, by count / sqrt(degree), so that
popular items do not fill every list) makes it an M x M problem:
B[S_i, i] = (G[S_i, S_i] + l2 I)^-1 G[S_i, i], zero elsewhere. G is never formed: each
item's co-occurrence counts are accumulated from its users' histories, its M regressors
and its top ``LOOKUP_FACTOR`` x M co-occurring items by count kept (``neighbour_lists``),
and G[S_i, S_i] is read from those lists (G[a, c] is known when c is in a's list or a in
c's, else taken as 0; a matrix made indefinite by that gets more ridge). The solves run in
batches as torch Cholesky factorisations (CPU or CUDA). Work: the sum over users of their
history length squared for the counts, N x M x ``LOOKUP_FACTOR`` x M for the lookups and
N x M^3 / 3 for the solves; memory O(N x M) beyond the counts' lists. With M = N - 1 and
every pair of items co-occurring it is EASE exactly (tested); with M chosen on validation
it is within 0.3% of the exact fit's test Recall@20 on Gowalla and MovieLens-1M
(docs/accuracy.md).

Code h's posting list is row h of B: the items whose regressions h takes part in, each
code keeping its top ``cap`` (``columns_index``; ``item_codes.item_code_index``'s rules).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import torch

from sparcode.engine import CodeIndex

from . import defaults
from .data import CSR
from .item_codes import interaction_matrix, ridge

DEGREE_POWER = 0.5  # regressors ranked by count / degree**this (docs/accuracy.md: the ranking screen)
LOOKUP_FACTOR = 4  # each item's co-occurrence list for G[S_i, S_i] holds this x M items (1x lost 16% on MovieLens-1M)
SOLVE_BYTES = 2**28  # the sub-Gram matrices solved at once: enough to batch, little enough to stay in cache and memory
CHUNK = 1 << 16  # items counted at once: bounds the padded lists before they are packed
MIN_WIDTH = 16  # the smallest system solved: an item with fewer regressors pads to it


@dataclass
class Neighbours:
    """Each item's regressors and co-occurrence list. ``ids`` (N, M) int32: its M
    regressors, best first (-1 pads an item with fewer co-occurring items); ``counts``
    (N, M) float32: G[i, ids[i, j]]; ``indptr`` (N + 1) int64, ``items`` int32 and
    ``item_counts`` float32: its top ``LOOKUP_FACTOR`` x M co-occurring items by count,
    sorted by id (a CSR); ``degree`` (N) float32: G[i, i]."""

    ids: np.ndarray
    counts: np.ndarray
    indptr: np.ndarray
    items: np.ndarray
    item_counts: np.ndarray
    degree: np.ndarray

    @property
    def width(self) -> int:
        return self.ids.shape[1]


def neighbour_lists(train: CSR, n_items: int, neighbours: int,
                    progress: Callable[[int], None] | None = None) -> Neighbours:
    """Every item's ``neighbours`` regressors and co-occurrence list (``Neighbours``),
    counted from the users' histories with a dense counter per worker (O(N) each).
    ``progress`` is called with the number of items counted after each chunk."""
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
        raise ValueError(f"neighbours: expected a positive int, got {neighbours!r}")
    width = min(neighbours, max(n_items - 1, 1))
    lookup = min(LOOKUP_FACTOR * width, max(n_items - 1, 1))
    by_user = interaction_matrix(train, n_items)
    by_item = by_user.T.tocsr()
    user_ptr, user_items = by_user.indptr.astype(np.int64), by_user.indices.astype(np.int32)
    item_ptr, item_users = by_item.indptr.astype(np.int64), by_item.indices.astype(np.int32)
    ids = np.full((n_items, width), -1, dtype=np.int32)
    counts = np.zeros((n_items, width), dtype=np.float32)
    degree = np.diff(item_ptr).astype(np.float32)
    lengths, items, item_counts = [np.zeros(1, dtype=np.int64)], [], []
    for lo in range(0, n_items, CHUNK):
        hi = min(lo + CHUNK, n_items)
        table = np.full((hi - lo, lookup), -1, dtype=np.int32)
        table_counts = np.zeros((hi - lo, lookup), dtype=np.float32)
        _count_neighbours(user_ptr, user_items, item_ptr, item_users, degree, lo, hi, numba.get_num_threads(),
                          DEGREE_POWER, ids, counts, table, table_counts)
        kept = table >= 0
        lengths.append(kept.sum(1))
        items.append(table[kept])
        item_counts.append(table_counts[kept])
        if progress is not None:
            progress(hi - lo)
    return Neighbours(ids, counts, np.concatenate(lengths).cumsum(), np.concatenate(items), np.concatenate(item_counts),
                      degree)


@numba.njit(cache=True, nogil=True)
def _top(cand, score, k, width):  # pragma: no cover - numba
    """The positions in cand[:k] of the ``width`` best scores, best first, ties to the lower id."""
    order = np.argsort(cand[:k])
    if k > width:
        floor = np.partition(-score[:k], width - 1)[width - 1]  # minus the width-th best score
        ties = width
        for s in range(k):
            if -score[s] < floor:
                ties -= 1
        m = 0
        for s in order:  # by id, so the ties kept are the lowest ids
            if -score[s] < floor or (-score[s] == floor and ties > 0):
                if -score[s] == floor:
                    ties -= 1
                order[m] = s
                m += 1
        order = order[:m]
    best = np.argsort(-score[order], kind="mergesort")
    return order[best]


@numba.njit(parallel=True, cache=True, nogil=True)
def _count_neighbours(user_ptr, user_items, item_ptr, item_users, degree, lo, hi, workers, power,
                      ids, counts, table, table_counts):  # pragma: no cover - numba
    n = ids.shape[0]
    for w in numba.prange(workers):  # items strided over workers: popular ones spread out
        count = np.zeros(n, dtype=np.int32)
        touched = np.empty(n, dtype=np.int32)
        cand = np.empty(n, dtype=np.int32)
        score = np.empty(n, dtype=np.float64)
        for i in range(lo + w, hi, workers):
            t = 0
            for p in range(item_ptr[i], item_ptr[i + 1]):
                u = item_users[p]
                for q in range(user_ptr[u], user_ptr[u + 1]):
                    j = user_items[q]
                    if count[j] == 0:
                        touched[t] = j
                        t += 1
                    count[j] += 1
            count[i] = 0  # an item is not its own regressor
            k = 0
            for s in range(t):
                j = touched[s]
                if count[j] > 0:
                    cand[k] = j
                    score[k] = count[j] / np.float64(degree[j]) ** power  # degree >= count > 0
                    k += 1
            chosen = _top(cand, score, k, ids.shape[1])
            for s in range(chosen.size):
                ids[i, s] = cand[chosen[s]]
                counts[i, s] = count[cand[chosen[s]]]
            for s in range(k):
                score[s] = count[cand[s]]
            chosen = np.sort(cand[_top(cand, score, k, table.shape[1])])
            for s in range(chosen.size):
                table[i - lo, s] = chosen[s]
                table_counts[i - lo, s] = count[chosen[s]]
            for s in range(t):
                count[touched[s]] = 0


@numba.njit(parallel=True, cache=True, nogil=True)
def _sub_grams(ids, counts, indptr, items, item_counts, degree, members, m, l2, workers, grams, rhs):  # pragma: no cover - numba
    """grams[b] = G[S_i, S_i] + l2 I and rhs[b] = G[S_i, i] over the first ``m``
    regressors of item i = members[b]: G[a, c] is known when c is in a's list or a in c's, else 0. Each
    regressor's list (at most ``LOOKUP_FACTOR`` x M long) is scanned against a map from
    item to position in S_i."""
    n = ids.shape[0]
    for w in numba.prange(workers):
        pos = np.full(n, -1, dtype=np.int32)
        for b in range(w, members.size, workers):
            i = members[b]
            for j in range(m):
                a = ids[i, j]
                for p in range(m):
                    grams[b, j, p] = 0.0
                if a < 0:  # padding: a unit row and no target, so its weight is 0
                    grams[b, j, j] = 1.0
                    rhs[b, j] = 0.0
                    continue
                pos[a] = j
                grams[b, j, j] = degree[a] + l2
                rhs[b, j] = counts[i, j]
            for j in range(m):
                a = ids[i, j]
                if a < 0:
                    continue
                for s in range(indptr[a], indptr[a + 1]):
                    p = pos[items[s]]
                    if p >= 0 and p != j:
                        grams[b, j, p] = item_counts[s]
                        grams[b, p, j] = item_counts[s]
            for j in range(m):
                if ids[i, j] >= 0:
                    pos[ids[i, j]] = -1


@torch.no_grad()
def neighbour_columns(train: CSR, n_items: int, *, neighbours: int = defaults.ITEM_CODES_NEIGHBOURS,
                      l2_scale: float = defaults.ITEM_CODES_L2, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, batch: int | None = None,
                      shard: tuple[int, int] = (0, 1),
                      progress: Callable[[str, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """B's columns over each item's neighbours: (ids (N, M) int32, weights (N, M)
    float32), B[ids[i, j], i] = weights[i, j] (ids -1 and weights 0 where an item has
    fewer than M co-occurring items). Items are solved in groups by their number of
    regressors rounded up to a power of two (at least ``MIN_WIDTH``), ``batch`` at once
    (default: their sub-Gram matrices in ``SOLVE_BYTES``). ``shard`` (rank, world) solves
    only the rank's share of each group, the other items' weights left 0, so that the
    ranks' weights add up to one rank's (``gather_columns``). ``progress(stage, items)``
    is called after each chunk counted (``"count"``) and each batch solved (``"solve"``)."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard: expected (rank, world) with 0 <= rank < world, got {shard}")
    l2 = ridge(train, n_items, l2_scale)
    lists = neighbour_lists(train, n_items, neighbours, None if progress is None else lambda k: progress("count", k))
    device = torch.device(device)
    weights = np.zeros(lists.ids.shape, dtype=np.float32)
    sizes = (lists.ids >= 0).sum(1)
    if progress is not None and (sizes == 0).any() and rank == 0:
        progress("solve", int((sizes == 0).sum()))  # nothing co-occurs with these: their columns are 0
    widths = np.minimum(np.maximum(MIN_WIDTH, 2 ** np.ceil(np.log2(np.maximum(sizes, 1)))), lists.width).astype(np.int64)
    for m in np.unique(widths[sizes > 0]):  # items with few neighbours solve a smaller system
        members = np.array_split(np.nonzero((widths == m) & (sizes > 0))[0], world)[rank]
        step = batch or max(1, SOLVE_BYTES // (int(m) ** 2 * 4))
        grams = np.empty((min(step, members.size), m, m), dtype=np.float32)
        rhs = np.empty((min(step, members.size), m), dtype=np.float32)
        for start in range(0, members.size, step):
            part = members[start : start + step]
            _sub_grams(lists.ids, lists.counts, lists.indptr, lists.items, lists.item_counts, lists.degree, part, m, l2,
                       numba.get_num_threads(), grams, rhs)
            a = torch.from_numpy(grams[: part.size]).to(device, dtype)
            factor, info = torch.linalg.cholesky_ex(a)
            bad = torch.nonzero(info).flatten()
            if bad.numel():  # a sub-Gram with unknown entries taken as 0 may lose definiteness: more ridge
                factor[bad] = _cholesky_with_more_ridge(a[bad], l2)
            solved = torch.cholesky_solve(torch.from_numpy(rhs[: part.size]).to(device, dtype)[..., None], factor)
            weights[part, :m] = solved[..., 0].float().cpu().numpy()
            if progress is not None:
                progress("solve", part.size)
    weights[lists.ids < 0] = 0
    return lists.ids, weights


def gather_columns(weights: np.ndarray) -> np.ndarray:
    """Every rank's ``neighbour_columns`` weights summed into one (each item is solved on
    one rank and 0 on the others, so the sum is exact): under ``torch.distributed``."""
    import torch.distributed as dist

    total = torch.from_numpy(weights)
    dist.all_reduce(total)
    return total.numpy()


def _cholesky_with_more_ridge(a: torch.Tensor, l2: float) -> torch.Tensor:
    """Cholesky factors of symmetric ``a`` (b, m, m) with l2 added to the diagonal until each is definite."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for step in range(1, 31):
        factor, info = torch.linalg.cholesky_ex(a + step * l2 * eye)
        if not info.any():
            return factor
    raise ValueError("train: a neighbour Gram matrix stays indefinite under 30 x the ridge")


def columns_index(ids: np.ndarray, weights: np.ndarray, n_items: int, cap: int,
                  keep: str = defaults.ITEM_CODES_KEEP) -> CodeIndex:
    """The index of B given by columns (``neighbour_columns``): code h lists the items i
    with h among i's regressors, its ``cap`` largest weights by magnitude or its ``cap``
    highest positive ones, items sorted; exact zeros dropped. V = N codes."""
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap: expected a positive int (items per code), got {cap!r}")
    if keep not in defaults.ITEM_CODES_KEEPS:
        raise ValueError(f"keep: expected one of {', '.join(defaults.ITEM_CODES_KEEPS)}, got {keep!r}")
    if ids.shape != weights.shape or ids.ndim != 2 or ids.shape[0] != n_items:
        raise ValueError(f"ids, weights: expected two ({n_items}, M) arrays, got {ids.shape} and {weights.shape}")
    indptr, items, values = _transpose_top(ids, weights, n_items, cap, keep == "positive")
    return CodeIndex.from_postings(indptr, items, values, n_items)


@numba.njit(parallel=True, cache=True, nogil=True)
def _transpose_top(ids, weights, n_items, cap, positive):  # pragma: no cover - numba
    n, m = ids.shape
    lengths = np.zeros(n_items + 1, dtype=np.int64)
    for i in range(n):  # code h's candidates: the items i whose column has h
        for j in range(m):
            h, v = ids[i, j], weights[i, j]
            if h >= 0 and (v > 0 if positive else v != 0):
                lengths[h + 1] += 1
    starts = np.cumsum(lengths)
    fill = starts[:-1].copy()
    items = np.empty(starts[-1], dtype=np.int32)
    values = np.empty(starts[-1], dtype=np.float32)
    for i in range(n):  # in item order, so each code's candidates are sorted by item
        for j in range(m):
            h, v = ids[i, j], weights[i, j]
            if h >= 0 and (v > 0 if positive else v != 0):
                items[fill[h]] = i
                values[fill[h]] = v
                fill[h] += 1
    kept = np.zeros(n_items + 1, dtype=np.int64)
    for h in range(n_items):
        kept[h + 1] = min(starts[h + 1] - starts[h], cap)
    indptr = np.cumsum(kept)
    out_items = np.empty(indptr[-1], dtype=np.int32)
    out_values = np.empty(indptr[-1], dtype=np.float32)
    for h in numba.prange(n_items):
        a, b, o = starts[h], starts[h + 1], indptr[h]
        if b - a <= cap:
            out_items[o : o + b - a] = items[a:b]
            out_values[o : o + b - a] = values[a:b]
            continue
        order = np.argsort(-np.abs(values[a:b]), kind="mergesort")[:cap]  # stable: ties to the lower item
        order.sort()
        for s in range(cap):
            out_items[o + s] = items[a + order[s]]
            out_values[o + s] = values[a + order[s]]
    return indptr, out_items, out_values
