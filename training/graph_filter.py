"""Graph-filter codes: item codes whose (code, item) scores are a linear graph filter.

GF-CF (Shen et al., 2021) scores a user's items by filtering their 0/1 history row r
through the normalised item graph: with R~ = D_U^-1/2 R D_I^-1/2 (R the user x item
training matrix, D its degrees), s = r (R~^T R~ + alpha D_I^-1/2 V V^T D_I^1/2), where
R~^T R~ is the normalised co-occurrence (a linear low-pass filter) and V holds R~'s top
right singular vectors (an ideal low-pass filter). The score is linear in the history,
so row h of that item x item matrix is what history item h adds to each item: it
serves as item h's posting list exactly as EASE's B does (``item_codes``). The rows are
produced a block at a time (sparse products for the co-occurrence, a rank-``vectors``
product for the ideal filter), so no N x N matrix exists at once; each code keeps its
top ``cap`` scores as they come (``item_codes.rows_index``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
import scipy.sparse
import torch

from sparcode.engine import CodeIndex, Engine

from . import defaults
from .data import CSR, InteractionData, screen_split
from .evaluate import evaluate_engine
from .export import ExportRule
from .item_codes import history_bags, interaction_matrix, item_scores, rows_index, rows_indexes


def normalized(train: CSR, n_items: int) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
    """R~ = D_U^-1/2 R D_I^-1/2 (float32 CSR) and the item degrees (1 for unseen items)."""
    x = interaction_matrix(train, n_items)
    users = np.maximum(np.asarray(x.sum(1)).ravel(), 1.0)
    items = np.maximum(np.asarray(x.sum(0)).ravel(), 1.0)
    norm = scipy.sparse.diags(users**-0.5) @ x @ scipy.sparse.diags(items**-0.5)
    return norm.astype(np.float32).tocsr(), items.astype(np.float32)


def low_pass_basis(norm: scipy.sparse.csr_matrix, vectors: int, seed: int = 0) -> torch.Tensor:
    """(N, vectors) float32: R~'s top right singular vectors (randomized, seeded)."""
    vectors = min(vectors, min(norm.shape) - 1)
    if vectors < 1:
        return torch.zeros(norm.shape[1], 0)
    coo = norm.tocoo()
    matrix = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), coo.data, size=norm.shape,
                                     check_invariants=True).coalesce()
    torch.manual_seed(seed)
    _, _, v = torch.svd_lowrank(matrix, q=vectors + 16, niter=4)
    return v[:, :vectors].float().contiguous()


def filter_rows(train: CSR, n_items: int, *, alpha: float = defaults.GRAPH_FILTER_ALPHA,
                vectors: int = defaults.GRAPH_FILTER_VECTORS, rows: int = 2048, seed: int = 0,
                ease: torch.Tensor | None = None, ease_weight: float = 0.0) -> Iterator[torch.Tensor]:
    """The (N, N) filter matrix a block of ``rows`` rows at a time, in order (float32),
    plus ``ease_weight`` x EASE's (N, N) item-to-item weights ``ease`` when given (the
    two are linear in the history, so their sum serves through one set of lists)."""
    if not ease_weight >= 0 or (ease_weight > 0 and ease is None):
        raise ValueError(f"ease_weight: expected a weight >= 0 with the EASE matrix, got {ease_weight!r}")
    if not alpha >= 0:
        raise ValueError(f"alpha: expected a weight >= 0, got {alpha!r}")
    if isinstance(vectors, bool) or not isinstance(vectors, int) or vectors < 0:
        raise ValueError(f"vectors: expected an int >= 0, got {vectors!r}")
    norm, degrees = normalized(train, n_items)
    by_item = norm.T.tocsr()
    basis = low_pass_basis(norm, vectors, seed) if alpha > 0 and vectors > 0 else None
    if basis is not None:
        left = basis * torch.from_numpy(degrees**-0.5)[:, None]
        right = (basis * torch.from_numpy(degrees**0.5)[:, None]).T.contiguous()
    for lo in range(0, n_items, rows):
        block = torch.from_numpy((by_item[lo : lo + rows] @ norm).toarray())
        if basis is not None:
            block += alpha * (left[lo : lo + rows] @ right)
        if ease_weight > 0:
            block += ease_weight * ease[lo : lo + rows].to(block.device)
        yield block


def graph_filter_index(train: CSR, n_items: int, cap: int, *, alpha: float = defaults.GRAPH_FILTER_ALPHA,
                       vectors: int = defaults.GRAPH_FILTER_VECTORS, keep: str = "positive", seed: int = 0,
                       ease: torch.Tensor | None = None, ease_weight: float = 0.0) -> CodeIndex:
    """Graph-filter codes: each code's top ``cap`` filter scores (V = N), the filter
    optionally summed with ``ease_weight`` x EASE's weights."""
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap: expected a positive int (items per code), got {cap!r}")
    return rows_index(filter_rows(train, n_items, alpha=alpha, vectors=vectors, seed=seed, ease=ease,
                                  ease_weight=ease_weight), n_items, cap, keep)


def fit_on_validation(data: InteractionData, caps: int | Iterable[int], grid: Iterable[tuple[float, int, float]], *,
                      keeps: Iterable[str] = defaults.GRAPH_FILTER_KEEPS, metric: str = "recall@20", seed: int = 0,
                      split: str = defaults.GRAPH_FILTER_SPLIT, folds: int = defaults.GRAPH_FILTER_FOLDS,
                      fit: CSR | None = None) -> tuple[CodeIndex, dict, list[dict]]:
    """Graph-filter codes with the (alpha, vectors, ease_weight) of ``grid``, the keep
    rule of ``keeps`` and the items per code of ``caps`` that score best on validation by
    ``metric`` (the test split is not read): (index, the chosen setting, every setting
    with its validation scores and fit seconds). ``split="valid"`` screens on the data's
    validation split; ``split="wide"`` on a seeded 10% of every user's training items,
    ``folds`` disjoint such slices with their scores averaged (one slice's choice moves
    with the draw where a user holds two or three items out); ``split="tail"`` on the last
    10% of every user's list (``data.screen_split``: on Gowalla about 15x as many held-out
    items as the validation split; the tail mirrors a test split made by time);
    ``split="auto"`` takes the tail where ``data.test_by`` is "time", else the wide one.
    The chosen setting is then refitted on ``fit`` (default the training split).
    EASE's weights (``item_codes.item_scores``, default l2) are fitted once per training
    set a setting uses them on; the keep rules and caps share one pass over the rows; a
    tie goes to the smaller index."""
    if split not in defaults.GRAPH_FILTER_SPLITS:
        raise ValueError(f"split: expected one of {defaults.GRAPH_FILTER_SPLITS}, got {split!r}")
    if isinstance(folds, bool) or not isinstance(folds, int) or not 1 <= folds <= 10:
        raise ValueError(f"folds: expected an int from 1 to 10 (disjoint 10% slices), got {folds!r}")
    grid, caps = list(grid), sorted({caps} if isinstance(caps, int) else set(caps))
    if not caps:
        raise ValueError("caps: needs at least one number of items per code")
    if not grid:
        raise ValueError("grid: needs at least one (alpha, vectors) setting")
    if split == "auto":
        split = "tail" if data.test_by == "time" else "wide"
    folds = folds if split == "wide" else 1
    per_fold = [screen_scores(data if split == "valid" else screen_split(data, split, seed=seed, fold=fold),
                              caps, grid, keeps, seed) for fold in range(folds)]
    scores = [dict(runs[0], **{key: float(np.mean([run[key] for run in runs]))
                               for key in runs[0] if key.startswith("valid_") or key == "fit_seconds"})
              for runs in zip(*per_fold)]
    best = max(range(len(scores)), key=lambda i: (scores[i][f"valid_{metric}"], -scores[i]["cap"], -i))
    chosen = dict(scores[best], split=split, folds=folds)
    fit = data.train if fit is None else fit
    started = time.perf_counter()
    weights = item_scores(fit, data.n_items) if chosen["ease_weight"] > 0 else None
    index = graph_filter_index(fit, data.n_items, chosen["cap"], alpha=chosen["alpha"], vectors=chosen["vectors"],
                               keep=chosen["keep"], seed=seed, ease=weights, ease_weight=chosen["ease_weight"])
    chosen["fit_seconds"] = time.perf_counter() - started
    return index, chosen, scores


def screen_scores(screen: InteractionData, caps: list[int], grid: list[tuple[float, int, float]], keeps: Iterable[str],
                  seed: int) -> list[dict]:
    """Every (setting, keep, cap) fitted on ``screen.train`` and scored on ``screen.valid``,
    in the grid's order, with its fit seconds."""
    bags = history_bags(screen.train)
    ease, ease_seconds = None, 0.0
    if any(point[2] > 0 for point in grid):
        started = time.perf_counter()
        ease = item_scores(screen.train, screen.n_items)
        ease_seconds = time.perf_counter() - started
    out = []
    for alpha, vectors, ease_weight in grid:
        started = time.perf_counter()
        rows = filter_rows(screen.train, screen.n_items, alpha=alpha, vectors=vectors, seed=seed, ease=ease,
                           ease_weight=ease_weight)
        indexes = rows_indexes(rows, screen.n_items, caps, keeps)
        seconds = time.perf_counter() - started + (ease_seconds if ease_weight > 0 else 0.0)
        for (keep, cap), index in indexes.items():
            m = evaluate_engine(Engine(index), bags, screen, split="valid")
            out.append({"alpha": alpha, "vectors": vectors, "ease_weight": ease_weight, "keep": keep, "cap": cap,
                        "fit_seconds": seconds, **{f"valid_{k}": m[k] for k in ("recall@20", "ndcg@20", "recall@50")}})
    return out


def screened_caps(n_items: int) -> list[int]:
    """The items per code screened on validation when none is given: each fraction of
    ``defaults.GRAPH_FILTER_CAP_DENSITIES`` x N, at least 1 and at most
    ``defaults.ITEM_CODES_CAP`` (the index stays N x 500 pairs at most)."""
    return sorted({min(ExportRule.top(f, n_items).cap, defaults.ITEM_CODES_CAP, n_items)
                   for f in defaults.GRAPH_FILTER_CAP_DENSITIES})


def grid_point(text: str) -> tuple[float, int, float]:
    """"ALPHA:VECTORS[:EASE]" -> (alpha, vectors, ease_weight), as ``--graph-filter-grid``
    spells a setting (EASE's weight 0 when absent)."""
    try:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError
        point = float(parts[0]), int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0
    except ValueError:
        raise ValueError(f"expected ALPHA:VECTORS[:EASE] such as 0.3:256 or 0.3:256:1, got {text!r}") from None
    if not point[0] >= 0 or point[1] < 0 or not point[2] >= 0:
        raise ValueError(f"expected alpha, vectors and the EASE weight >= 0, got {text!r}")
    return point
