"""Item codes: a query's codes are the items of its history, and each code's posting
list holds the items that its item promotes or demotes most.

The (code, item) scores are EASE's item-to-item weights (Steck, 2019): over the user x
item training matrix X, B = argmin ||X - XB||^2 + l2 ||B||^2 with diag(B) = 0, whose
closed form is B = -P / diag(P) off the diagonal for P = (X^T X + l2 I)^-1. A user's
score of an item is the sum over their history items h of B[h, item], which is
SparCode's search exactly: V = N codes, no quantization, a user's bag of codes is their
history (ragged: ``history_bags``). The all-to-all interaction is learned between items rather
than between a quantized user and an item, so no user detail is lost to a codebook; on
ID-only data it is more accurate than quantized user tokens (docs/accuracy.md). The fit holds two
N x N float32 matrices (Gowalla's 40,981 items: 13.4 GB; 10-14 minutes on 2 CPU cores).
"""

from __future__ import annotations

from collections.abc import Iterable

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
                device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, N) float32 B on ``device``: B[h, i] is what history item h adds to item i's
    score (see the module's docstring)."""
    x = interaction_matrix(train, n_items)
    gram = (x.T @ x).toarray().astype(np.float32, copy=False)  # float32 already: no second N x N copy
    gram = torch.from_numpy(gram).to(device)
    gram.diagonal().add_(ridge(train, n_items, l2_scale))
    factor = torch.linalg.cholesky(gram)
    del gram
    scores = torch.cholesky_inverse(factor)
    del factor
    scores /= -scores.diagonal().clone()[None, :]
    scores.diagonal().zero_()
    return scores


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
    return rows_indexes(blocks, n_items, cap, (keep,))[keep]


@torch.no_grad()
def rows_indexes(blocks: Iterable[torch.Tensor], n_items: int, cap: int, keeps: Iterable[str]) -> dict[str, CodeIndex]:
    """``rows_index`` under several keep rules from one pass over the blocks."""
    keeps = tuple(dict.fromkeys(keeps))
    for keep in keeps:
        if keep not in defaults.ITEM_CODES_KEEPS:
            raise ValueError(f"keep: expected one of {', '.join(defaults.ITEM_CODES_KEEPS)}, got {keep!r}")
    cap = min(cap, n_items)
    parts = {keep: ([torch.zeros(1, dtype=torch.int64)], [], []) for keep in keeps}
    for block in blocks:
        for keep, (lengths, items, values) in parts.items():
            ids = torch.topk(block.abs() if keep == "magnitude" else block, cap, dim=1).indices.sort(dim=1).values
            top = block.gather(1, ids)
            kept = top != 0 if keep == "magnitude" else top > 0
            lengths.append(kept.sum(1).cpu())
            items.append(ids[kept].to(torch.int32).cpu())
            values.append(top[kept].float().cpu())
    return {keep: CodeIndex.from_postings(torch.cat(lengths).cumsum(0), torch.cat(items), torch.cat(values), n_items)
            for keep, (lengths, items, values) in parts.items()}


def history_bags(train: CSR) -> tuple[np.ndarray, np.ndarray]:
    """Every user's bag of codes, their training items, as (flat codes int64, offsets
    (U + 1) int64): ragged, so a batch costs the histories it holds, not U x the longest."""
    return train.items.astype(np.int64), train.indptr.astype(np.int64)
