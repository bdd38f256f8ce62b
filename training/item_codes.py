"""Item codes: a query's codes are the items of its history, and each code's posting
list holds the items that its item promotes or demotes most.

The (code, item) scores are EASE's item-to-item weights (Steck, 2019): over the user x
item training matrix X, B = argmin ||X - XB||^2 + l2 ||B||^2 with diag(B) = 0, whose
closed form is B = -P / diag(P) off the diagonal for P = (X^T X + l2 I)^-1. A user's
score of an item is the sum over their history items h of B[h, item], which is
SparCode's search exactly: V = N codes, no quantization, a user's bag of codes is their
history (ragged: ``history_bags``). The all-to-all interaction is learned between items rather
than between a quantized user and an item, so no user detail is lost to a codebook; on
ID-only data it is more accurate than quantized user tokens (docs/accuracy.md). The exact fit
(``ease_rows``) inverts the smaller of the U x U and N x N Gram matrices and yields B a
block of rows at a time (Gowalla, 29,858 users and 40,981 items: see docs/accuracy.md for
its time and peak memory on 2 CPU cores).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import scipy.sparse
import torch

from sparcode.engine import CodeIndex

from . import defaults
from .data import CSR


def interaction_matrix(train: CSR, n_items: int) -> scipy.sparse.csr_matrix:
    """The (users, items) 0/1 training matrix."""
    ones = np.ones(train.items.size, dtype=np.float32)
    return scipy.sparse.csr_matrix((ones, train.items, train.indptr), shape=(len(train.indptr) - 1, n_items))


def ridge(train: CSR, n_items: int, l2_scale: float = defaults.ITEM_CODES_L2) -> float:
    """The l2 weight: ``l2_scale`` times the mean item's training interactions, so that
    one default fits catalogues of any popularity."""
    if not l2_scale > 0:
        raise ValueError(f"l2_scale: expected a positive number, got {l2_scale}")
    if train.items.size == 0:
        raise ValueError("train: no interactions to fit item codes from")
    return l2_scale * train.items.size / n_items


@torch.no_grad()
def item_scores(train: CSR, n_items: int, *, l2_scale: float = defaults.ITEM_CODES_L2,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, N) B on ``device``: B[h, i] is what history item h adds to item i's score
    (see the module's docstring); ``ease_rows`` gathered. float32 serves; float64 is the
    reference it is checked against."""
    return torch.cat(list(ease_rows(train, n_items, l2_scale=l2_scale, device=device, dtype=dtype)))


@torch.no_grad()
def ease_rows(train: CSR, n_items: int, *, l2_scale: float = defaults.ITEM_CODES_L2,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              rows: int = 2048) -> Iterator[torch.Tensor]:
    """EASE's B a block of ``rows`` rows at a time ((rows, N) on ``device``), for
    ``rows_index``: B = -P / diag(P) with diag(B) = 0, where P = (X^T X + l2 I)^-1.
    With fewer users than items P = (I - X^T K^-1 X) / l2, K = X X^T + l2 I (Woodbury),
    so the one dense matrix is U x U and no N x N matrix exists; otherwise the N x N
    inverse is the one dense matrix."""
    x = interaction_matrix(train, n_items)
    l2 = ridge(train, n_items, l2_scale)
    device = torch.device(device)
    if x.shape[0] >= n_items:
        p = _inverse_of_gram(x.T.tocsr(), l2, device, dtype, rows)
        diag = p.diagonal().clone()
        for lo in range(0, n_items, rows):
            block = p[lo : lo + rows] / -diag[None, :]
            yield _zero_diagonal(block, lo)
        return
    k_inv = _inverse_of_gram(x, l2, device, dtype, rows)
    by_item = x.T.tocsr()  # (N, U): row i holds item i's users
    def products(lo: int) -> torch.Tensor:  # (rows, U): X[:, block]^T K^-1
        return _sparse_mm(by_item[lo : lo + rows], k_inv)
    diag = torch.empty(n_items, dtype=dtype, device=device)
    for lo in range(0, n_items, rows):  # diag(P)_i = (1 - x_i^T K^-1 x_i) / l2
        part = by_item[lo : lo + rows].tocoo()
        row, col = (torch.from_numpy(a).to(device) for a in (part.row, part.col))
        quad = products(lo)[row, col] * torch.from_numpy(part.data).to(device, dtype)
        own = torch.zeros(part.shape[0], dtype=dtype, device=device).index_add_(0, row, quad)
        diag[lo : lo + part.shape[0]] = (1 - own) / l2
    for lo in range(0, n_items, rows):  # P[block] off its diagonal: -X[:, block]^T K^-1 X / l2
        block = _sparse_mm(by_item, products(lo).T).T
        yield _zero_diagonal(block / (l2 * diag[None, :]), lo)


def _zero_diagonal(block: torch.Tensor, lo: int) -> torch.Tensor:
    """``block`` (rows lo.. of an N x N matrix) with its entries on the diagonal zeroed."""
    at = torch.arange(block.shape[0], device=block.device)
    block[at, lo + at] = 0
    return block


def _sparse_mm(a: scipy.sparse.csr_matrix, dense: torch.Tensor) -> torch.Tensor:
    """a @ dense on ``dense``'s device and dtype (scipy on CPU, torch's sparse product on CUDA)."""
    if dense.device.type == "cpu":
        return torch.from_numpy(np.asarray(a.astype(dense.numpy().dtype) @ dense.numpy()))
    return torch_csr(a, dense.device, dense.dtype) @ dense


def torch_csr(a: scipy.sparse.csr_matrix, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``a`` as a torch sparse CSR tensor on ``device``."""
    return torch.sparse_csr_tensor(torch.from_numpy(a.indptr).long(), torch.from_numpy(a.indices).long(),
                                   torch.from_numpy(a.data), size=a.shape, dtype=dtype, device=device)


def _inverse_of_gram(a: scipy.sparse.csr_matrix, l2: float, device: torch.device, dtype: torch.dtype,
                     rows: int) -> torch.Tensor:
    """(a a^T + l2 I)^-1, dense and symmetric (m, m) on ``device``: the product formed a
    block of rows at a time into one matrix, then torch's Cholesky factor and inverse
    written over it. The matrix is symmetric, so LAPACK gets its transposed view, which
    is column-major: it works in place, with no second m x m copy (on 2 CPU cores an
    8,000 x 8,000 inverse also runs in 2.0 s instead of 3.2)."""
    m = a.shape[0]
    out = np.empty((m, m), dtype=np.float64 if dtype == torch.float64 else np.float32)
    a_t = a.T.tocsc()
    for lo in range(0, m, rows):
        out[lo : lo + rows] = (a[lo : lo + rows] @ a_t).toarray()
    out[np.diag_indices(m)] += l2
    gram = torch.from_numpy(out).to(device)
    del out
    column_major = gram.mT  # the same storage: LAPACK's layout, so nothing is copied
    _, info = torch.linalg.cholesky_ex(column_major, out=(column_major, torch.empty((), dtype=torch.int32, device=device)))
    if int(info):
        raise ValueError(f"train: the regularized Gram matrix is not positive definite (minor {int(info)})")
    torch.cholesky_inverse(column_major, out=column_major)
    return gram


@torch.no_grad()
def item_code_index(scores: torch.Tensor, cap: int, *, keep: str = defaults.ITEM_CODES_KEEP,
                    rows: int = 4096) -> CodeIndex:
    """Each code's ``cap`` largest scores by magnitude (``keep="magnitude"``) or its
    ``cap`` highest positive ones (``"positive"``), items sorted within each list; V = N
    codes (code h is history item h); float32 scores; exact zeros dropped. The sum is
    linear, so a negative weight demotes its item as a positive one promotes it: on MovieLens-1M at
    10% magnitude gives Recall@50 0.4214 against 0.4070. On Gowalla's 1% (410 of 40,981
    items per code) positive scores give 0.1748 Recall@20 against 0.1739: there the
    slots are worth more as candidates (docs/accuracy.md)."""
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores: expected a square (N, N) matrix, got {tuple(scores.shape)}")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap: expected a positive int (items per code), got {cap!r}")
    return rows_index((scores[lo : lo + rows] for lo in range(0, scores.shape[0], rows)), scores.shape[1], cap, keep)


def rows_index(blocks: Iterable[torch.Tensor], n_items: int, cap: int, keep: str = defaults.ITEM_CODES_KEEP) -> CodeIndex:
    """The index of an item-to-item matrix given as consecutive blocks of rows (code h =
    row h): each row's ``cap`` kept scores (``item_code_index``'s rules), so that no
    N x N matrix has to exist at once."""
    return rows_indexes(blocks, n_items, (cap,), (keep,))[keep, cap]


@torch.no_grad()
def rows_indexes(blocks: Iterable[torch.Tensor], n_items: int, caps: Iterable[int],
                 keeps: Iterable[str]) -> dict[tuple[str, int], CodeIndex]:
    """``rows_index`` under each keep rule and each cap, keyed ``(keep, cap)``, from one
    pass over the blocks (a smaller cap keeps the head of a larger one's ranking)."""
    keeps, caps = tuple(dict.fromkeys(keeps)), tuple(dict.fromkeys(caps))
    for keep in keeps:
        if keep not in defaults.ITEM_CODES_KEEPS:
            raise ValueError(f"keep: expected one of {', '.join(defaults.ITEM_CODES_KEEPS)}, got {keep!r}")
    for cap in caps:
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"cap: expected a positive int (items per code), got {cap!r}")
    widest = min(max(caps), n_items)
    parts = {(keep, cap): ([torch.zeros(1, dtype=torch.int64)], [], []) for keep in keeps for cap in caps}
    for block in blocks:
        for keep in keeps:
            ranked = torch.topk(block.abs() if keep == "magnitude" else block, widest, dim=1).indices
            for cap in caps:
                lengths, items, values = parts[keep, cap]
                ids = ranked[:, : min(cap, n_items)].sort(dim=1).values
                top = block.gather(1, ids)
                kept = top != 0 if keep == "magnitude" else top > 0
                lengths.append(kept.sum(1).cpu())
                items.append(ids[kept].to(torch.int32).cpu())
                values.append(top[kept].float().cpu())
    return {key: CodeIndex.from_postings(torch.cat(lengths).cumsum(0), torch.cat(items), torch.cat(values), n_items)
            for key, (lengths, items, values) in parts.items()}


def history_bags(train: CSR) -> tuple[np.ndarray, np.ndarray]:
    """Every user's bag of codes, their training items, as (flat codes int64, offsets
    (U + 1) int64): ragged, so a batch costs the histories it holds, not U x the longest."""
    return train.items.astype(np.int64), train.indptr.astype(np.int64)
