"""The torch backend: the reference search path and the CPU default.

Candidate accumulation is a sparse x sparse product (scipy on CPU, torch on CUDA): the (B x V) matrix of the
queries' summed code weights (1 per code without weights; a code repeated in a query counts twice) times the (V x N) CSR score
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

from sparcode.kernels.keys import pack_keys, select_row_keys

from .bags import Bags
from .index import CodeIndex
from .plan import Plan
from .selection import Exclusion, all_positive, score_floor


def score_matrix(index: CodeIndex, complex_values: bool = False) -> object:
    """The index as a (V x N) sparse matrix: scipy CSR on CPU, torch CSR on CUDA.

    CPU: torch's CSR @ CSR leaks about 5 MB per call on CPU (torch 2.13, measured) and
    COO is 3x slower, so the CPU product runs in scipy (same speed, no leak). scipy
    drops entries whose sum is exactly 0, which only a zero or negative stored score
    can produce (or a weighted sum that underflows); such indexes, and every weighted
    search (``complex_values``), use complex64 values with imaginary part 1, so every
    entry's imaginary sum is a positive count (or a sum of positive weights) and no
    candidate is lost. Weights that can cancel take a second, pattern product
    (``pattern_matrix``).
    """
    index_dtype = _index_dtype(index.nnz)
    if index.device.type == "cpu":
        import scipy.sparse

        values = index.scores.to(torch.float32).numpy()
        if complex_values or not all_positive(index):
            values = values + np.complex64(1j)
        return scipy.sparse.csr_matrix(
            (values, index.items.numpy(), index.indptr.to(index_dtype).numpy()),
            shape=(index.n_codes, index.n_items),
        )
    return _csr(
        index.indptr.to(index_dtype), index.items.to(index_dtype), index.scores.to(torch.float32),
        (index.n_codes, index.n_items),
    )


def candidates(index: CodeIndex, bags: Bags) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query candidates as CSR rows: (row offsets (B+1) int64, items (int32 or int64),
    summed scores float32)."""
    n_queries = bags.n_queries
    n_codes = index.n_codes
    device = bags.codes.device
    flat = bags.query_of() * n_codes + bags.codes
    order = torch.argsort(flat, stable=True)
    keys, inverse = torch.unique_consecutive(flat[order], return_inverse=True)
    weights = torch.ones(order.numel(), device=device) if bags.weights is None else bags.weights[order]
    values = torch.zeros(keys.numel(), dtype=torch.float32, device=device).index_add_(0, inverse, weights)
    rows = keys // n_codes
    crow = torch.zeros(n_queries + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.bincount(rows, minlength=n_queries).cumsum(0)
    index_dtype = _index_dtype(index.nnz)
    if device.type == "cpu":
        import scipy.sparse

        def product(matrix, vals):
            queries = scipy.sparse.csr_matrix(
                (vals.numpy(), (keys % n_codes).to(index_dtype).numpy(), crow.to(index_dtype).numpy()),
                shape=(n_queries, n_codes))
            return queries @ matrix

        if bags.weights is not None and not bool((bags.weights > 0).all()):
            return _with_pattern(product(index.derived(("score_matrix", False), score_matrix), values),
                                 product(index.derived("pattern_matrix", pattern_matrix), values.abs() + 1))
        matrix = index.derived(("score_matrix", bags.weights is not None),
                               lambda ix: score_matrix(ix, complex_values=bags.weights is not None))
        result = product(matrix, values)
        sums = result.data.real if np.iscomplexobj(result.data) else result.data
        return (torch.from_numpy(result.indptr).to(torch.int64), torch.from_numpy(result.indices),
                torch.from_numpy(np.ascontiguousarray(sums, dtype=np.float32)))
    matrix = index.derived(("score_matrix", False), score_matrix)
    queries = _csr(crow.to(index_dtype), (keys % n_codes).to(index_dtype), values, (n_queries, n_codes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        product = queries @ matrix
    return product.crow_indices().to(torch.int64), product.col_indices(), product.values()


def pattern_matrix(index: CodeIndex) -> object:
    """The index's sparsity pattern as a scipy CSR of ones (CPU): with weights that can
    cancel, a second product with positive values finds every candidate."""
    import scipy.sparse

    return scipy.sparse.csr_matrix(
        (np.ones(index.nnz, dtype=np.float32), index.items.numpy(), index.indptr.to(_index_dtype(index.nnz)).numpy()),
        shape=(index.n_codes, index.n_items))


def _with_pattern(values: object, pattern: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates of ``pattern`` (every (query, item) in some list) with their sums from
    ``values`` (scipy drops sums that are exactly 0: those are 0)."""
    values.sort_indices()
    pattern.sort_indices()
    n_items = pattern.shape[1]
    crow = torch.from_numpy(pattern.indptr).to(torch.int64)
    cols = torch.from_numpy(pattern.indices).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(pattern.shape[0]), crow.diff())
    v_crow = torch.from_numpy(values.indptr).to(torch.int64)
    v_keys = torch.repeat_interleave(torch.arange(values.shape[0]), v_crow.diff()) * n_items + \
        torch.from_numpy(values.indices).to(torch.int64)
    sums = torch.zeros(cols.numel(), dtype=torch.float32)
    data = values.data.real if np.iscomplexobj(values.data) else values.data
    sums[torch.searchsorted(rows * n_items + cols, v_keys)] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return crow, cols, sums


class TorchBackend:
    """Sparse-product accumulation + exact packed-key selection; works on any device."""

    name = "torch"
    # Peak workspace per gathered posting: the product's columns, values and row ids,
    # the keep mask, and the padded value and gather-index matrices of the selection
    # (at most twice the candidates), with headroom for the sparse product's temporaries.
    bytes_per_posting = 96

    def plan(self, index: CodeIndex, bags: Bags, k: int) -> Plan:
        postings = bags.postings(index.lengths).cpu().numpy()
        return Plan(self.bytes_per_posting * postings + 16 * k, regime="sparse-product")

    def search(
        self, index: CodeIndex, bags: Bags, k: int, exclude: Exclusion, regime: str = "sparse-product"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        crow, items, sums = candidates(index, bags)
        n_queries = bags.n_queries
        device = bags.codes.device
        lengths = crow.diff()
        n_excluded = torch.zeros(n_queries, dtype=torch.int64, device=device)
        if exclude is not None and exclude[1].numel():
            n_excluded = exclude[0].diff()
        # Drop what provably cannot reach the top k (and the excluded items), then
        # order the survivors exactly by packed key.
        keep = sums >= torch.repeat_interleave(score_floor(index, bags, k + n_excluded), lengths)
        if exclude is not None and exclude[1].numel():
            queries = torch.arange(n_queries, device=device)
            rows = torch.repeat_interleave(queries, lengths)
            ex_rows = torch.repeat_interleave(queries, n_excluded)
            keep &= ~torch.isin(rows * index.n_items + items, ex_rows * index.n_items + exclude[1])
        at = torch.nonzero(keep).squeeze(1)
        crow = torch.searchsorted(at, crow)  # survivors before each row start
        return select_row_keys(crow, pack_keys(sums[at], items[at]), k)


def _index_dtype(nnz: int) -> torch.dtype:
    return torch.int32 if nnz < 2**31 else torch.int64


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)
