"""An independent dense oracle for search: numpy, B x N, token order, float32."""

from __future__ import annotations

import numpy as np
import torch

from sparcode.engine import CodeIndex


def dense_search(index: CodeIndex, codes: np.ndarray, k: int, exclude: list[np.ndarray] | None = None):
    """Scores and ids (B, k) by brute force: sum the T lists densely, order by
    (score desc, item asc), candidates only, -1/-inf padding; internal ids."""
    indptr = index.indptr.cpu().numpy()
    items = index.items.cpu().numpy()
    scores = index.scores.cpu().to(torch.float32).numpy()
    n_queries = codes.shape[0]
    out_scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
    out_ids = np.full((n_queries, k), -1, dtype=np.int64)
    for q in range(n_queries):
        acc = np.zeros(index.n_items, dtype=np.float32)
        present = np.zeros(index.n_items, dtype=bool)
        for code in codes[q]:
            lo, hi = indptr[code], indptr[code + 1]
            acc[items[lo:hi]] += scores[lo:hi]
            present[items[lo:hi]] = True
        if exclude is not None:
            present[np.asarray(exclude[q], dtype=np.int64)] = False
        cand = np.nonzero(present)[0]
        order = np.lexsort((cand, -acc[cand]))[:k]
        out_ids[q, : order.size] = cand[order]
        out_scores[q, : order.size] = acc[cand[order]]
    return out_scores, out_ids


def assert_same_results(scores, ids, ref_scores, ref_ids, *, exact: bool) -> None:
    """Exact: identical ids and scores. Otherwise scores to 1e-5 relative and ids equal
    except where the oracle's scores tie within that tolerance."""
    scores, ids = np.asarray(scores), np.asarray(ids)
    if exact:
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(scores, ref_scores)
        return
    np.testing.assert_array_equal(ids == -1, ref_ids == -1)
    finite = ref_ids >= 0
    np.testing.assert_allclose(scores[finite], ref_scores[finite], rtol=1e-5, atol=1e-6)
    differ = (ids != ref_ids) & finite
    if differ.any():
        # a swap is only allowed between (near-)tied scores
        np.testing.assert_allclose(scores[differ], ref_scores[differ], rtol=1e-5, atol=1e-6)
