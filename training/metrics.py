"""Ranking metrics as BARS defines them: per user with at least one test item, over the
top K of a full ranking (training items excluded upstream), then averaged."""

from __future__ import annotations

import numpy as np

from .data import CSR


def ranking_metrics(ranked: np.ndarray, test: CSR, users: np.ndarray, ks: tuple[int, ...] = (10, 20, 50)) -> dict[str, float]:
    """``ranked`` (len(users), >= max(ks)) item ids best first (-1 = none) -> Recall,
    NDCG (binary relevance, ideal DCG over min(|test|, K)), Precision, HitRate @K."""
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg", "precision", "hitrate")}
    counted = 0
    discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    for row, user in zip(ranked, users):
        truth = test.row(int(user))
        if len(truth) == 0:
            continue
        counted += 1
        hits = np.isin(row[: max(ks)], truth)
        for k in ks:
            n_hit = int(hits[:k].sum())
            sums[f"recall@{k}"] += n_hit / len(truth)
            sums[f"precision@{k}"] += n_hit / k
            sums[f"hitrate@{k}"] += float(n_hit > 0)
            ideal = discounts[: min(len(truth), k)].sum()
            sums[f"ndcg@{k}"] += float((hits[:k] * discounts[:k]).sum() / ideal)
    return {name: value / max(counted, 1) for name, value in sums.items()} | {"users": counted}
