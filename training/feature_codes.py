"""Feature codes: a user's categorical features, and every pair of them, as codes.

Each (feature, value) a user holds is a code, and so is each (feature a, value, feature b,
value) pair: a pair carries what neither value does alone (an age band within an
occupation; on the synthetic set the user segment, which is a pair of two features).
Only the values and pairs some user holds get codes, so V stays at most U x K for K =
F + F (F - 1) / 2 codes per user. Code c's posting list holds each item's lift among
the users who hold c, from the training interactions:

    score(c, i) = n(c, i) / n(c) - n(i) / n

n(c, i) the interactions of c's users with item i, n(c) all of theirs, n(i) item i's and n
everyone's: how much more often (or, negative, less often) c's users take item i than users
at large. The scores are linear counts, fitted in one pass without training, and serve beside
graph-filter codes in one index (``ensemble.py``), the family's weight chosen on validation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import combinations

import numpy as np
import scipy.sparse
import torch

from .data import CSR, InteractionData
from .item_codes import interaction_matrix, rows_indexes


def feature_codes(features: np.ndarray) -> tuple[np.ndarray, int]:
    """Every user's codes ((U, K) int64, K = F + F (F - 1) / 2: each feature's value, then
    each pair's) and the number of codes V, ids dense in [0, V) over the values and pairs held."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] < 1 or features.dtype.kind not in "iu":
        raise ValueError(f"features: expected a (users, F >= 1) integer matrix, got shape {features.shape} "
                         f"dtype {features.dtype}")
    if features.size and features.min() < 0:
        raise ValueError(f"features: expected categorical ids >= 0, got {int(features.min())}")
    columns = [features[:, [j]] for j in range(features.shape[1])]
    columns += [features[:, [a, b]] for a, b in combinations(range(features.shape[1]), 2)]
    codes, base = np.empty((features.shape[0], len(columns)), np.int64), 0
    for k, column in enumerate(columns):
        _, ids = np.unique(column, axis=0, return_inverse=True)
        codes[:, k] = ids.ravel() + base
        base += int(ids.max(initial=-1)) + 1
    return codes, base


def lift_rows(train: CSR, codes: np.ndarray, n_codes: int, n_items: int, rows: int | None = None
              ) -> Iterator[torch.Tensor]:
    """The (V, N) lift scores (see the module's docstring) a block of ``rows`` rows at a
    time (float32; by default blocks of at most 2^26 scores, 256 MB); a code whose users
    have no training interaction scores 0 everywhere."""
    rows = rows or max(1, min(n_codes, 2**26 // max(n_items, 1)))
    users, per_user = codes.shape
    if users != len(train.indptr) - 1:
        raise ValueError(f"codes: expected one row per user ({len(train.indptr) - 1}), got {users}")
    if train.items.size == 0:
        raise ValueError("train: no interactions to fit feature codes from")
    held = scipy.sparse.csr_matrix((np.ones(codes.size, np.float32), codes.ravel(), np.arange(users + 1) * per_user),
                                   shape=(users, n_codes))
    counts = (held.T @ interaction_matrix(train, n_items)).tocsr()  # (V, N) n(c, i)
    per_code = np.asarray(counts.sum(1)).ravel()
    base = torch.from_numpy(np.bincount(train.items, minlength=n_items) / train.items.size).float()
    for lo in range(0, n_codes, rows):
        n = torch.from_numpy(per_code[lo : lo + rows]).float()[:, None]
        block = torch.from_numpy(counts[lo : lo + rows].toarray()) / n - base
        yield torch.where(n > 0, block, torch.zeros(()))


def feature_family(data: InteractionData, caps: Iterable[int]) -> dict[int, tuple]:
    """The users' feature codes as a family for ``ensemble.fit_weights``: {cap: (index,
    every user's bag)}, each code's list its ``cap`` largest lifts by magnitude (a lift is
    as often negative as positive)."""
    if data.user_features is None:
        raise ValueError(f"data: {data.name} has no user features to make feature codes from")
    codes, n_codes = feature_codes(data.user_features)
    bags = codes.ravel(), np.arange(data.n_users + 1, dtype=np.int64) * codes.shape[1]
    indexes = rows_indexes(lift_rows(data.train, codes, n_codes, data.n_items), data.n_items, caps, ["magnitude"])
    return {cap: (index, bags) for (_, cap), index in indexes.items()}
