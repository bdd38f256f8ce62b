"""The CPU backend: per-query accumulation compiled with numba, queries in parallel.

Each worker owns a dense float32 accumulator over items (N x 4 bytes, NaN = not yet
touched), reused for every query it handles. For one query it adds its bag's posting
lists in bag order, each score times the code's weight (so sums match the other
backends bit for bit), remembers the touched items without a branch per posting, drops
excluded ones and those under the query's score floor (``score_floor``: they cannot
reach the top k) and keeps the k best int64 keys (``sparcode.kernels.keys``): in a
min-heap of k keys that also clears the touched slots in the same pass (k <= 256), or
by a partition and a sort. Work follows the postings, never N, and there is no
per-query allocation of N. Needs numba (the ``cpu`` extra); without it
``backend="auto"`` uses the torch backend.

For indexes whose queries touch a large share of the items the backend sums the query's
dense score rows instead (``engine/dense.py``): T x N sequential float32 reads, which
the compiler vectorises, against one random access per posting. ``choose_regime``
compares the two by cost per query, when the rows fit the memory budget.
"""
from __future__ import annotations

from functools import cache

import numba
import numpy as np
import torch
from numba.core import types
from numba.extending import overload

from sparcode.kernels.keys import EMPTY_KEY, ITEM_BIAS, MAGNITUDE_MASK, SCORE_SHIFT, unpack_keys

from .bags import Bags
from .dense import dense_rows, fits
from .index import CodeIndex
from .plan import Plan
from .selection import Exclusion, all_positive, score_floor


@numba.njit(cache=True, nogil=True)
def _pack(total: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``sparcode.kernels.keys.pack_keys`` for numba: the same bits."""
    bits = (total + np.float32(0.0)).view(np.int32).astype(np.int64)
    ordered = bits ^ ((bits >> 31) & MAGNITUDE_MASK)
    return (ordered << SCORE_SHIFT) | (ITEM_BIAS - ids.astype(np.int64))


def _score(scores: np.ndarray, table: np.ndarray, p: int) -> float:
    """Posting ``p``'s score as float32: ``scores`` float32 itself, or the 16-bit patterns
    of a float16 / bfloat16 index looked up in ``table`` (compiled only, by the overload)."""
    raise NotImplementedError("compiled by numba only")


@overload(_score)
def _score_typed(scores, table, p):
    if isinstance(scores.dtype, types.Float):
        return lambda scores, table, p: scores[p]
    return lambda scores, table, p: table[scores[p]]


@cache
def _table(dtype: torch.dtype) -> np.ndarray:
    """The float32 value of every 16-bit pattern of ``dtype`` (256 KB, stays in cache):
    numba has no float16 or bfloat16 arithmetic, and a float32 copy of a 671M-posting
    index's scores would be 2.7 GB."""
    return torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(dtype).float().numpy()


def _scores_and_table(index: CodeIndex) -> tuple[np.ndarray, np.ndarray]:
    """The index's scores as numba reads them: float32 as they are, 16-bit ones as their
    bit patterns with the table that decodes them."""
    if index.scores.dtype == torch.float32:
        return index.scores.numpy(), np.zeros(1, dtype=np.float32)
    return index.scores.view(torch.int16).numpy().view(np.uint16), _table(index.scores.dtype)


@numba.njit(cache=True, nogil=True)
def _write_top(acc, ids, k, out_row):
    """The k best (acc[id], id) keys of ``ids``, best first, ``EMPTY_KEY``-padded, into ``out_row``."""
    keys = _pack(acc[ids], ids)
    if ids.size > k:
        keys = np.partition(keys, ids.size - k)[ids.size - k :]
    keys = np.sort(keys)[::-1]
    out_row[: keys.size] = keys
    out_row[keys.size :] = EMPTY_KEY


@numba.njit(cache=True, nogil=True)
def _key(bits: np.int32, item: np.int64) -> np.int64:
    """``pack_keys`` of one float32 given by its bit pattern (-0.0 folds onto 0.0)."""
    if bits == np.int32(-2147483648):
        bits = np.int32(0)
    ordered = np.int64(bits ^ ((bits >> 31) & MAGNITUDE_MASK))
    return (ordered << SCORE_SHIFT) | (ITEM_BIAS - item)


@numba.njit(cache=True, nogil=True)
def _sift_down(heap, at, size):
    """Restore the min-heap below ``at``."""
    key = heap[at]
    while True:
        child = 2 * at + 1
        if child >= size:
            break
        if child + 1 < size and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= key:
            break
        heap[at] = heap[child]
        at = child
    heap[at] = key


@numba.njit(cache=True, nogil=True)
def _heap_top(acc, bits, ids, n_ids, bound, heap, out_row, clear):
    """The k = ``heap.size`` best keys of ``ids[:n_ids]`` whose sum reaches ``bound`` (NaN
    never does), best first, ``EMPTY_KEY``-padded, into ``out_row``: a min-heap of k keys,
    so each candidate costs one compare once the heap is full (np.partition touches
    every candidate several times). With ``clear`` each visited slot is reset to NaN in
    the same pass."""
    k = heap.size
    size = 0
    for j in range(n_ids):
        item = ids[j]
        value = acc[item]
        key = _key(bits[item], np.int64(item))
        if clear:
            acc[item] = np.nan
        if not value >= bound:
            continue
        if size < k:
            at = size
            size += 1
            while at > 0:  # sift up
                parent = (at - 1) // 2
                if heap[parent] <= key:
                    break
                heap[at] = heap[parent]
                at = parent
            heap[at] = key
        elif key > heap[0]:
            heap[0] = key
            _sift_down(heap, 0, k)
    top = np.sort(heap[:size])[::-1]
    out_row[:size] = top
    out_row[size:] = EMPTY_KEY


@numba.njit(parallel=True, cache=True, nogil=True)
def _search(indptr, items, scores, table, codes, offsets, weights, weighted, ex_offsets, ex_items, floor, n_items, k,
            n_workers, out):
    n_queries = offsets.size - 1
    per_worker = (n_queries + n_workers - 1) // n_workers
    for worker in numba.prange(n_workers):
        # NaN marks "no posting yet": one random access per posting, no separate flags
        acc = np.full(n_items, np.nan, dtype=np.float32)
        bits = acc.view(np.int32)
        heap = np.empty(min(k, HEAP_K), dtype=np.int64)
        touched = np.empty(16, dtype=np.int32)
        for q in range(worker * per_worker, min(n_queries, (worker + 1) * per_worker)):
            need = 0
            for t in range(offsets[q], offsets[q + 1]):
                need += indptr[codes[t] + 1] - indptr[codes[t]]
            if need + 1 > touched.size:  # + 1: the branch-free append writes one slot past the last
                touched = np.empty(max(need + 1, 2 * touched.size), dtype=np.int32)
            n_touched = 0
            for t in range(offsets[q], offsets[q + 1]):
                code = codes[t]
                w = weights[t] if weighted else np.float32(1.0)
                for p in range(indptr[code], indptr[code + 1]):
                    item = items[p]
                    value = _score(scores, table, p)
                    if weighted:
                        value = w * value
                    current = acc[item]
                    fresh = current != current
                    touched[n_touched] = item  # kept only when fresh: no branch to mispredict
                    n_touched += fresh
                    acc[item] = value if fresh else current + value
            for p in range(ex_offsets[q], ex_offsets[q + 1]):
                acc[ex_items[p]] = np.nan
            if k <= HEAP_K:  # selects and clears the touched slots in one pass
                _heap_top(acc, bits, touched, n_touched, floor[q], heap, out[q], True)
            else:
                ids = np.empty(n_touched, dtype=np.int64)
                n_kept = 0
                for j in range(n_touched):
                    item = touched[j]
                    if acc[item] >= floor[q]:  # False for NaN: excluded items drop out here
                        ids[n_kept] = item
                        n_kept += 1
                _write_top(acc, ids[:n_kept], k, out[q])
                for j in range(n_touched):
                    acc[touched[j]] = np.nan


@numba.njit(parallel=True, cache=True, nogil=True)
def _search_dense(rows, positive, codes, offsets, weights, weighted, ex_offsets, ex_items, floor, k, n_workers, out):
    """One query at a time: its dense rows summed in bag order over all items, then one
    scan keeps the items at or above its score floor. With ``positive`` (every stored
    score > 0, no weights) absent pairs are 0 and a sum is a candidate iff it is > 0
    (0 + s = s and s + 0 = s exactly, so bag order holds); otherwise absent pairs are NaN."""
    n_queries = offsets.size - 1
    n_items = rows.shape[1]
    per_worker = (n_queries + n_workers - 1) // n_workers
    for worker in numba.prange(n_workers):
        acc = np.empty(n_items, dtype=np.float32)
        bits = acc.view(np.int32)
        ids = np.empty(n_items, dtype=np.int64)
        every = np.arange(n_items)
        heap = np.empty(min(k, HEAP_K), dtype=np.int64)
        for q in range(worker * per_worker, min(n_queries, (worker + 1) * per_worker)):
            acc[:] = np.float32(0.0) if positive else np.float32(np.nan)
            for t in range(offsets[q], offsets[q + 1]):
                row = rows[codes[t]]
                w = weights[t] if weighted else np.float32(1.0)
                if positive:
                    for j in range(n_items):
                        acc[j] += row[j]
                else:
                    for j in range(n_items):  # NaN: absent so far / absent from this list
                        a = acc[j]
                        v = row[j]
                        if weighted:
                            v = w * v
                        acc[j] = v if a != a else (a if v != v else a + v)
            for p in range(ex_offsets[q], ex_offsets[q + 1]):
                acc[ex_items[p]] = np.nan
            bound = floor[q]
            if positive and not bound > 0:
                bound = np.float32(1e-45)  # the smallest positive float32: present items only
            if k <= HEAP_K:
                _heap_top(acc, bits, every, n_items, bound, heap, out[q], False)
                continue
            n_kept = 0
            for j in range(n_items):
                if acc[j] >= bound:  # False for NaN: absent and excluded items drop out here
                    ids[n_kept] = j
                    n_kept += 1
            _write_top(acc, ids[:n_kept], k, out[q])


HEAP_K = 256  # up to this k, selection keeps a min-heap of k keys; above it, a partition

# Per-query cost of the two CPU regimes in ns per unit of work, measured on 2 AMD EPYC
# cores at the R1 and R2 CPU shapes (docs/performance.md): a posting is a random access
# into the query's accumulator plus its share of the selection (15-18 ns); a dense row
# element is one vectorised add (0.9 ns), and the final scan one compare per item.
POSTING_COST = 16.0
DENSE_ITEM_COST = 1.0
SCAN_COST = 1.0


def choose_regime(n_items: int, n_tokens: float, mean_postings: float) -> str:
    """"cpu-dense" when summing T dense rows costs less than visiting the postings."""
    dense = n_items * (n_tokens * DENSE_ITEM_COST + SCAN_COST)
    return "cpu-dense" if dense < mean_postings * POSTING_COST else "cpu-accumulate"


class NumbaBackend:
    """The fastest CPU path: compiled per-query accumulation (over posting lists, or over
    dense score rows when queries touch most items and the rows fit) + partial selection.

    ``dense_bytes`` bounds the dense rows' memory (None: a fraction of the available
    memory, ``engine/dense.py``; 0: never dense). ``regime`` forces a path for tests and
    benchmarks: "auto", "cpu-accumulate" or "cpu-dense"."""

    name = "numba"
    REGIMES = ("auto", "cpu-accumulate", "cpu-dense")

    def __init__(self, dense_bytes: int | None = None, regime: str = "auto") -> None:
        if regime not in self.REGIMES:
            raise ValueError(f"regime: expected one of {self.REGIMES}, got {regime!r}")
        self.dense_bytes, self.regime = dense_bytes, regime

    def plan(self, index: CodeIndex, bags: Bags, k: int) -> Plan:
        postings = bags.postings(index.lengths).cpu().numpy()
        regime = self.regime
        if regime == "auto":
            mean = float(postings.mean()) if postings.size else 0.0
            tokens = float(bags.codes.numel()) / max(1, bags.n_queries)
            regime = choose_regime(index.n_items, tokens, mean)
            if regime == "cpu-dense" and not fits(index, torch.float32, self.dense_bytes):
                regime = "cpu-accumulate"
        if regime == "cpu-dense":  # the rows are shared; per query only the (B, k) keys
            return Plan(np.full(postings.shape, 16 * k), regime=regime)
        if k <= HEAP_K:  # the (B, k) keys; each worker reuses one touched list (4 bytes a posting)
            return Plan(np.full(postings.shape, 16 * k), regime=regime)
        # touched list, ids and keys per posting; the (B, k) keys
        return Plan(24 * postings + 16 * k, regime=regime)

    def search(
        self, index: CodeIndex, bags: Bags, k: int, exclude: Exclusion, regime: str = "cpu-accumulate"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if index.device.type != "cpu":
            raise ValueError("backend: 'numba' runs on CPU indexes only")
        n_queries = bags.n_queries
        if exclude is None:
            ex_offsets, ex_items = np.zeros(n_queries + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        else:
            ex_offsets, ex_items = exclude[0].numpy(), exclude[1].numpy()
        floor = score_floor(index, bags, k + torch.from_numpy(np.diff(ex_offsets))).numpy()
        out = np.empty((n_queries, k), dtype=np.int64)
        codes, offsets = bags.codes.numpy(), bags.offsets.numpy()
        weighted = bags.weights is not None
        weights = bags.weights.numpy() if weighted else np.ones(1, dtype=np.float32)
        if n_queries:
            workers = min(numba.get_num_threads(), n_queries)
            if regime == "cpu-dense":
                positive = all_positive(index) and not weighted
                rows = dense_rows(index, torch.float32, absent=0.0 if positive else float("nan")).numpy()
                _search_dense(rows, positive, codes, offsets, weights, weighted, ex_offsets, ex_items, floor, k,
                              workers, out)
            else:
                scores, table = _scores_and_table(index)
                _search(index.indptr.numpy(), index.items.numpy(), scores, table, codes, offsets, weights, weighted,
                        ex_offsets, ex_items, floor, index.n_items, k, workers, out)
        return unpack_keys(torch.from_numpy(out))
