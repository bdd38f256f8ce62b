"""An independent dense oracle for search: numpy, B x N, token order, float32."""

from __future__ import annotations

import numpy as np
import torch

from sparcode.engine import CodeIndex


def dense_scores(index: CodeIndex, codes: np.ndarray, exclude: list[np.ndarray] | None = None) -> np.ndarray:
    """(B, N) float32: each item's summed score over the query's T lists in token order,
    NaN where the item is in none of them or is excluded (not a candidate)."""
    return bag_scores(index, np.asarray(codes).tolist(), None, exclude)


def bag_scores(index: CodeIndex, bags: list[list[int]], weights: list[list[float]] | None = None,
               exclude: list[np.ndarray] | None = None) -> np.ndarray:
    """(B, N) float32 like :func:`dense_scores` for ragged bags: each list's scores times
    its code's float32 weight, added in bag order."""
    indptr = index.indptr.cpu().numpy()
    items = index.items.cpu().numpy()
    scores = index.scores.cpu().to(torch.float32).numpy()
    out = np.full((len(bags), index.n_items), np.nan, dtype=np.float32)
    for q, bag in enumerate(bags):
        acc = np.zeros(index.n_items, dtype=np.float32)
        present = np.zeros(index.n_items, dtype=bool)
        for j, code in enumerate(bag):
            lo, hi = indptr[code], indptr[code + 1]
            w = np.float32(1.0 if weights is None else weights[q][j])
            acc[items[lo:hi]] += w * scores[lo:hi]
            present[items[lo:hi]] = True
        if exclude is not None:
            present[np.asarray(exclude[q], dtype=np.int64)] = False
        out[q, present] = acc[present]
    return out


def top_k(truth: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids (B, k) of (B, N) sums (NaN: not a candidate), by (score desc, item asc)."""
    out_scores = np.full((truth.shape[0], k), -np.inf, dtype=np.float32)
    out_ids = np.full((truth.shape[0], k), -1, dtype=np.int64)
    for q, row in enumerate(truth):
        cand = np.nonzero(~np.isnan(row))[0]
        order = np.lexsort((cand, -row[cand]))[:k]
        out_ids[q, : order.size] = cand[order]
        out_scores[q, : order.size] = row[cand[order]] + np.float32(0.0)  # -0.0 folds onto 0.0, as keys do
    return out_scores, out_ids


def dense_search(index: CodeIndex, codes: np.ndarray, k: int, exclude: list[np.ndarray] | None = None):
    """Scores and ids (B, k) by brute force: order by (score desc, item asc), candidates
    only, -1/-inf padding; internal ids."""
    return top_k(dense_scores(index, codes, exclude), k)


def assert_same_results(scores, ids, ref_scores, ref_ids) -> None:
    """Identical ids and scores, bit for bit."""
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_array_equal(np.asarray(scores), ref_scores)


def assert_equivalent_results(scores, ids, index: CodeIndex, codes: np.ndarray, k: int,
                              exclude: list[np.ndarray] | None = None, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Results equal to the oracle's up to float rounding, where ties may reorder and
    nothing else may: every returned id is a candidate, not excluded, unique in its row,
    and returned with its true score; the row's scores are the oracle's top-k scores; the
    padding is where the oracle pads."""
    scores, ids = np.asarray(scores), np.asarray(ids)
    truth = dense_scores(index, codes, exclude)
    ref_scores, ref_ids = dense_search(index, codes, k, exclude)
    assert scores.shape == ids.shape == ref_ids.shape, (scores.shape, ids.shape, ref_ids.shape)
    np.testing.assert_array_equal(ids == -1, ref_ids == -1, err_msg="padding differs from the oracle's")
    assert np.all(scores[ids == -1] == -np.inf), "padding must score -inf"
    for q in range(ids.shape[0]):
        got = ids[q][ids[q] >= 0]
        assert np.unique(got).size == got.size, f"query {q}: an id is returned twice: {got.tolist()}"
        assert np.all((got >= 0) & (got < index.n_items)), f"query {q}: ids out of range: {got.tolist()}"
        true = truth[q, got]
        assert not np.isnan(true).any(), f"query {q}: ids {got[np.isnan(true)].tolist()} are not candidates or are excluded"
        np.testing.assert_allclose(scores[q, : got.size], true, rtol=rtol, atol=atol,
                                   err_msg=f"query {q}: a returned score is not its item's true score")
        np.testing.assert_allclose(scores[q, : got.size], ref_scores[q, : got.size], rtol=rtol, atol=atol,
                                   err_msg=f"query {q}: not the top-k scores")
