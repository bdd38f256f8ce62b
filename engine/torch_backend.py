"""The torch backend: the reference search path and the CPU default.

Candidate accumulation is a sparse x sparse product (scipy on CPU, torch on CUDA): the (B x V) matrix of code counts
of the queries (a code repeated in a query counts twice) times the (V x N) CSR score
matrix gives a (B x N) CSR matrix whose row b holds exactly query b's candidates with
their float32 sums. Nothing of size B x N is allocated.

Selection drops the candidates that provably cannot reach the top k (``score_floor``),
packs the rest into int64 keys (score, then lower item id; ``sparcode.kernels.keys``)
and takes ``torch.topk`` per row: keys are unique, so the order is exact and
deterministic.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from sparcode.kernels.keys import (
    ITEM_BIAS,
    ITEM_MASK,
    ordered_to_score,
    pack_keys,
    score_to_ordered,
    select_row_keys,
)

from .index import CodeIndex
from .plan import Plan

Exclusion = tuple[torch.Tensor, torch.Tensor] | None


def score_matrix(index: CodeIndex) -> object:
    """The index as a (V x N) sparse matrix: scipy CSR on CPU, torch CSR on CUDA.

    CPU: torch's CSR @ CSR leaks about 5 MB per call on CPU (torch 2.13, measured) and
    COO is 3x slower, so the CPU product runs in scipy (same speed, no leak). scipy
    drops entries whose sum is exactly 0, which only a zero or negative stored score
    can produce; such indexes use complex64 values with imaginary part 1, so every
    entry's imaginary sum is a positive count and no candidate is lost.
    """
    index_dtype = _index_dtype(index.nnz)
    if index.device.type == "cpu":
        import scipy.sparse

        values = index.scores.to(torch.float32).numpy()
        if not _all_positive(index):
            values = values + np.complex64(1j)
        return scipy.sparse.csr_matrix(
            (values, index.items.numpy(), index.indptr.to(index_dtype).numpy()),
            shape=(index.n_codes, index.n_items),
        )
    return _csr(
        index.indptr.to(index_dtype), index.items.to(index_dtype), index.scores.to(torch.float32),
        (index.n_codes, index.n_items),
    )


def candidates(index: CodeIndex, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query candidates as CSR rows: (row offsets (B+1) int64, items (int32 or int64),
    summed scores float32)."""
    n_queries = codes.shape[0]
    n_codes = index.n_codes
    flat = (torch.arange(n_queries, device=codes.device).unsqueeze(1) * n_codes + codes).reshape(-1)
    keys, counts = torch.unique_consecutive(flat.sort().values, return_counts=True)
    rows = keys // n_codes
    crow = torch.zeros(n_queries + 1, dtype=torch.int64, device=codes.device)
    crow[1:] = torch.bincount(rows, minlength=n_queries).cumsum(0)
    index_dtype = _index_dtype(index.nnz)
    matrix = index.derived("score_matrix", score_matrix)
    if codes.device.type == "cpu":
        import scipy.sparse

        queries = scipy.sparse.csr_matrix(
            (counts.to(torch.float32).numpy(), (keys % n_codes).to(index_dtype).numpy(), crow.to(index_dtype).numpy()),
            shape=(n_queries, n_codes),
        )
        product = queries @ matrix
        sums = product.data.real if np.iscomplexobj(product.data) else product.data
        return (torch.from_numpy(product.indptr).to(torch.int64), torch.from_numpy(product.indices),
                torch.from_numpy(np.ascontiguousarray(sums, dtype=np.float32)))
    queries = _csr(crow.to(index_dtype), (keys % n_codes).to(index_dtype), counts.to(torch.float32), (n_queries, n_codes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        product = queries @ matrix
    return product.crow_indices().to(torch.int64), product.col_indices(), product.values()


class TorchBackend:
    """Sparse-product accumulation + exact packed-key selection; works on any device."""

    name = "torch"
    # Peak workspace per gathered posting: the product's columns, values and row ids,
    # the keep mask, and the padded value and gather-index matrices of the selection
    # (at most twice the candidates), with headroom for the sparse product's temporaries.
    bytes_per_posting = 96

    def plan(self, index: CodeIndex, codes: torch.Tensor, k: int) -> Plan:
        postings = index.lengths[codes].sum(1).cpu().numpy()
        return Plan(self.bytes_per_posting * postings + 16 * k, regime="sparse-product")

    def search(
        self, index: CodeIndex, codes: torch.Tensor, k: int, exclude: Exclusion, regime: str = "sparse-product"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        crow, items, sums = candidates(index, codes)
        n_queries = codes.shape[0]
        lengths = crow.diff()
        n_excluded = torch.zeros(n_queries, dtype=torch.int64, device=codes.device)
        if exclude is not None and exclude[1].numel():
            n_excluded = exclude[0].diff()
        # Drop what provably cannot reach the top k (and the excluded items), then
        # order the survivors exactly by packed key.
        keep = sums >= torch.repeat_interleave(score_floor(index, codes, k + n_excluded), lengths)
        if exclude is not None and exclude[1].numel():
            queries = torch.arange(n_queries, device=codes.device)
            rows = torch.repeat_interleave(queries, lengths)
            ex_rows = torch.repeat_interleave(queries, n_excluded)
            keep &= ~torch.isin(rows * index.n_items + items, ex_rows * index.n_items + exclude[1])
        at = torch.nonzero(keep).squeeze(1)
        crow = torch.searchsorted(at, crow)  # survivors before each row start
        return select_row_keys(crow, pack_keys(sums[at], items[at]), k)


SORT_BLOCK = 1 << 24  # postings sorted at a time: the keys cost 5 x 8 bytes per posting in flight


def descending_scores(index: CodeIndex) -> torch.Tensor:
    """Each posting list's scores in the index's dtype, sorted from high to low (a derived
    layout; the values are the index's own, so float16 holds them exactly at half the
    bytes of float32). Whole lists are sorted a block of about ``SORT_BLOCK`` postings at
    a time: at once, a 671M-posting index (Gowalla, every pair kept) needed 27 GB of keys
    and sort output."""
    out = torch.empty(index.nnz, dtype=index.scores.dtype, device=index.device)
    targets = torch.tensor(range(SORT_BLOCK, index.nnz, SORT_BLOCK), dtype=torch.int64, device=index.device)
    cuts = torch.searchsorted(index.indptr, targets)  # the first code starting at or past each target
    edges = torch.unique(torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), index.n_codes)])).tolist()
    for first, last in zip(edges[:-1], edges[1:]):
        lo, hi = int(index.indptr[first]), int(index.indptr[last])
        lengths = index.lengths[first:last]
        codes = torch.repeat_interleave(torch.arange(last - first, device=index.device), lengths)
        low = ITEM_BIAS - score_to_ordered(index.scores[lo:hi]).to(torch.int64)  # in [0, 2**32)
        keys = torch.sort((codes << 32) | low).values
        out[lo:hi] = ordered_to_score((ITEM_BIAS - (keys & ITEM_MASK)).to(torch.int32)).to(out.dtype)
    return out


def score_floor(index: CodeIndex, codes: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """A lower bound on each query's ``rank``-th best summed score (-inf when unknown).

    With only positive stored scores, an item's sum is at least its score in any one of
    the query's lists (float32 rounding is monotone), so the ``rank``-th best score of
    the longest useful list bounds the ``rank``-th best sum from below. Candidates
    under the bound cannot reach the top k; ``rank`` counts the query's excluded items
    too, since they may be among that list's best.
    """
    floor = torch.full((codes.shape[0],), float("-inf"), device=codes.device)
    if index.nnz == 0 or not _all_positive(index):
        return floor
    desc = index.derived("descending_scores", descending_scores)
    rank = rank.unsqueeze(1)
    present = index.lengths[codes] >= rank
    at = (index.indptr[codes] + rank - 1).clamp(max=index.nnz - 1)
    bounds = torch.where(present, desc[at].float(), float("-inf"))
    return torch.maximum(floor, bounds.max(dim=1).values)


def _all_positive(index: CodeIndex) -> bool:
    return index.derived("scores_positive", lambda ix: bool((ix.scores > 0).all()))


def _index_dtype(nnz: int) -> torch.dtype:
    return torch.int32 if nnz < 2**31 else torch.int64


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)
