"""Several code families in one index: each query's bag holds its codes of every family,
each family with its weight.

Families (item or graph-filter codes, tower codes, ...) are fitted apart; ``joined_index``
stacks their code spaces (family f's code c becomes c + the codes of the families before
it) and ``joined_bags`` concatenates each query's bags with one weight per code, so one
``Engine.search`` sums them: score(q, i) = sum over families of the weighted scores. The
weights are chosen on the validation split (``fit_weights``): the base family's code
weights are 1 / |bag|^p (p = 0 sums the history, p = 1 averages it, so a long history
does not drown the other family) and the added family's are w x the ratio of the two
families' score spreads, so that the grid of w is unitless.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.sparse
import torch

from sparcode.engine import CodeIndex, Engine

from . import defaults
from .data import InteractionData
from .evaluate import evaluate_engine

Bags = tuple[np.ndarray, np.ndarray]  # flat codes int64, offsets (U + 1) int64


def joined_index(indexes: list[CodeIndex]) -> CodeIndex:
    """One index whose codes are each family's in turn (same items, float32 scores)."""
    if not indexes:
        raise ValueError("indexes: needs at least one index")
    n_items = {index.n_items for index in indexes}
    if len(n_items) != 1:
        raise ValueError(f"indexes: every family must list the same items, got n_items {sorted(n_items)}")
    indptr, base = [torch.zeros(1, dtype=torch.int64)], 0
    for index in indexes:
        indptr.append(index.indptr[1:].cpu() + base)
        base += index.nnz
    return CodeIndex.from_postings(torch.cat(indptr), torch.cat([index.items.cpu() for index in indexes]),
                                   torch.cat([index.scores.cpu().float() for index in indexes]), n_items.pop())


def joined_bags(bags: list[Bags], n_codes: list[int], weights: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's codes of every family in turn, family f's shifted by the codes of the
    families before it, with their weights (``weights[f]``: one per code of ``bags[f]``):
    (codes int64, offsets (U + 1) int64, weights float32)."""
    if not len(bags) == len(n_codes) == len(weights) or not bags:
        raise ValueError(f"bags, n_codes, weights: expected one of each per family, got {len(bags)}, {len(n_codes)}, "
                         f"{len(weights)}")
    users = {offsets.size - 1 for _, offsets in bags}
    if len(users) != 1:
        raise ValueError(f"bags: every family must have the same queries, got {sorted(users)}")
    lengths = np.stack([np.diff(offsets) for _, offsets in bags])
    offsets = np.concatenate([[0], np.cumsum(lengths.sum(0))]).astype(np.int64)
    codes = np.empty(offsets[-1], dtype=np.int64)
    out_weights = np.empty(offsets[-1], dtype=np.float32)
    before = offsets[:-1].copy()  # where each query's next family starts
    shift = 0
    for (family_codes, family_offsets), size, w, length in zip(bags, n_codes, weights, lengths, strict=True):
        if w.shape != family_codes.shape:
            raise ValueError(f"weights: expected one per code {family_codes.shape}, got {w.shape}")
        at = np.repeat(before - family_offsets[:-1], length) + np.arange(family_codes.size)
        codes[at] = family_codes + shift
        out_weights[at] = w
        before += length
        shift += size
    return codes, offsets, out_weights


def bag_scores(index: CodeIndex, bags: Bags, users: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(len(users), N) float32 dense scores of ``users``' bags (a torch-free reference sum)."""
    codes, offsets = bags
    w = np.ones(codes.size, np.float32) if weights is None else weights
    rows = [np.arange(offsets[u], offsets[u + 1]) for u in users]
    picked = np.concatenate(rows) if rows else np.zeros(0, int)
    queries = scipy.sparse.csr_matrix((w[picked], codes[picked], np.concatenate([[0], np.cumsum([r.size for r in rows])])),
                                      shape=(len(users), index.n_codes))
    lists = scipy.sparse.csr_matrix((index.scores.cpu().float().numpy(), index.items.cpu().numpy(), index.indptr.cpu().numpy()),
                                    shape=(index.n_codes, index.n_items))
    return (queries @ lists).toarray().astype(np.float32)


def spread(index: CodeIndex, bags: Bags, users: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The mean over ``users`` of the standard deviation of their scores over the items."""
    return float(bag_scores(index, bags, users, weights).std(axis=1).mean())


def length_weights(bags: Bags, power: float) -> np.ndarray:
    """One weight per code: 1 / |its query's bag|^power (1 for every code at power 0)."""
    lengths = np.diff(bags[1])
    return np.repeat(np.maximum(lengths, 1).astype(np.float64) ** -power, lengths).astype(np.float32)


def fit_weights(data: InteractionData, base: tuple[CodeIndex, Bags], added: dict, *, powers: Iterable[float],
                weights: Iterable[float], metric: str, sample: int = 512, seed: int = 0
                ) -> tuple[CodeIndex, tuple[np.ndarray, np.ndarray, np.ndarray], dict, list[dict]]:
    """The joined index of ``base`` and one of ``added`` ({name: (index, bags)}, e.g. one
    per cap), with the base power p, the added family's weight w and the ``added`` entry
    that score best on the validation split by ``metric`` (the test split is not read).
    w is relative: the added family's code weights are w x spread(base) / spread(added),
    spreads over a seeded sample of ``sample`` users. Returns (index, joined bags, the
    chosen setting, every setting with its validation scores); w = 0 is the base alone."""
    powers, weights = list(powers), list(weights)
    if not powers or not weights or not added:
        raise ValueError("powers, weights, added: each needs at least one entry")
    base_index, base_bags = base
    users = np.sort(np.random.default_rng(seed).choice(data.n_users, size=min(sample, data.n_users), replace=False))
    scores, best = [], None
    for name, (index, bags) in added.items():
        index_joined = joined_index([base_index, index])
        added_spread = spread(index, bags, users)
        for power in powers:
            base_weights = length_weights(base_bags, power)
            ratio = spread(base_index, base_bags, users, base_weights) / max(added_spread, 1e-30)
            for w in weights:
                joined = joined_bags([base_bags, bags], [base_index.n_codes, index.n_codes],
                                     [base_weights, np.full(bags[0].size, w * ratio, np.float32)])
                m = evaluate_engine(Engine(index_joined), joined, data, split="valid")
                scores.append({"added": name, "power": power, "weight": w, "scale": ratio,
                               **{f"valid_{k}": m[k] for k in ("recall@20", "ndcg@20", "recall@50")}})
                key = (scores[-1][f"valid_{metric}"], -w)
                if best is None or key > best[3]:
                    best = (index_joined, joined, scores[-1], key)
    return best[0], best[1], best[2], scores


def join_family(data: InteractionData, index: CodeIndex, served: Bags, evaluated: Bags, added: dict, *,
                powers: Iterable[float] | None = None, weights: Iterable[float] | None = None,
                metric: str = "recall@20", seed: int = 0) -> tuple[CodeIndex, tuple, tuple, dict]:
    """Item codes (``index``) and an ``added`` family ({cap: (index, every user's bag)}) in
    one index, by ``fit_weights`` on the validation split over ``powers`` and ``weights``
    (default ``defaults.ENSEMBLE_POWERS`` and ``ENSEMBLE_WEIGHTS``; the item codes alone
    where weight 0 wins): (index, the ``served`` bags and the ``evaluated`` bags of item
    codes, each with the added codes joined and their weights, and the chosen setting with
    every setting screened under "grid")."""
    joined, _, best, grid = fit_weights(data, (index, evaluated), added,
                                        powers=defaults.ENSEMBLE_POWERS if powers is None else powers,
                                        weights=defaults.ENSEMBLE_WEIGHTS if weights is None else weights,
                                        metric=metric, seed=seed)
    setting = {**best, "grid": grid}
    if best["weight"] == 0:
        return index, served, evaluated, setting
    added_bags = added[best["added"]][1]
    scale = np.full(added_bags[0].size, best["weight"] * best["scale"], np.float32)
    sizes = [index.n_codes, joined.n_codes - index.n_codes]
    served, evaluated = (joined_bags([bags, added_bags], sizes, [length_weights(bags, best["power"]), scale])
                         for bags in (served, evaluated))
    return joined, served, evaluated, setting
