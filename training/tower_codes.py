"""Tower codes: a trained two-tower's user vectors as codes, served from posting lists.

A user vector u is quantized by residual k-means: level 0 takes the nearest of C
centres, each next level the nearest centre to what the levels before left, so
u ~ sum_t c_t(u) and u . v ~ sum_t c_t(u) . v: a sum over the user's ``levels`` codes,
which is what a bag of codes scores. Code (t, c) has id t * C + c and its posting list
holds c_t . v over the items, capped like every code's. Only the final user and item
vectors are read, so any tower converts (features, MLPs), and nothing is trained.
Tower codes sit in one index beside item or graph-filter codes (``ensemble.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from . import defaults
from .codebooks import kmeans
from .data import InteractionData
from .item_codes import rows_indexes
from .models import TwoTower
from .train import TrainConfig, tensors


@torch.no_grad()
def tower_vectors(model: TwoTower, data: InteractionData, cfg: TrainConfig, rows: int = 4096
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, d) user vectors (from each user's training history and features) and (N, d)
    item vectors of ``model``, float32 on CPU: their products are its scores."""
    if not isinstance(model, TwoTower):
        raise TypeError(f"model: expected a TwoTower, got {type(model).__name__}")
    model.eval()
    t = tensors(data, cfg)
    items = model.item_vectors(model.items(torch.arange(data.n_items, device=cfg.device), t["item_features"]))
    users = [model.user_vectors(t["history"][lo : lo + rows],
                                None if t["user_features"] is None else t["user_features"][lo : lo + rows])
             for lo in range(0, data.n_users, rows)]
    return torch.cat(users).float().cpu(), items.float().cpu()


def residual_codebooks(users: torch.Tensor, levels: int, size: int, *, iters: int = 10,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual k-means of ``users`` (U, d): centres (levels, size, d) and each user's
    code per level (U, levels) int64, level t fitted to the residual levels 0..t-1 left."""
    if users.ndim != 2 or users.shape[0] < 1:
        raise ValueError(f"users: expected a (U, d) matrix with U >= 1, got {tuple(users.shape)}")
    for name, value in (("levels", levels), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    size = min(size, users.shape[0])
    residual = users.float().clone()
    centres, codes = [], []
    for level in range(levels):
        c = kmeans(residual, size, iters=iters, seed=seed + level)
        assign = torch.cdist(residual, c).argmin(1)
        residual -= c[assign]
        centres.append(c)
        codes.append(assign)
    return torch.stack(centres), torch.stack(codes, 1)


def tower_bags(codes: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every user's bag of tower codes (code t * size + c at level t) as (flat codes
    int64, offsets (U + 1) int64): ``levels`` codes each."""
    users, levels = codes.shape
    flat = (codes + torch.arange(levels) * size).reshape(-1)
    return flat.numpy().astype(np.int64), np.arange(users + 1, dtype=np.int64) * levels


def tower_code_indexes(centres: torch.Tensor, items: torch.Tensor, caps: list[int], keeps: list[str],
                       rows: int = 2048) -> dict:
    """The tower codes' indexes keyed (keep, cap): code t * C + c lists centres[t, c] . v
    over the items v, each list capped by ``item_codes.rows_indexes``'s rules."""
    flat = centres.reshape(-1, centres.shape[-1]).float()
    blocks = (flat[lo : lo + rows] @ items.float().T for lo in range(0, flat.shape[0], rows))
    return rows_indexes(blocks, items.shape[0], caps, keeps)


def tower_family(model: TwoTower, data: InteractionData, cfg: TrainConfig, caps: list[int], *,
                 levels: int = defaults.TOWER_CODE_LEVELS, size: int = defaults.TOWER_CODE_SIZE,
                 seed: int = 0) -> dict[int, tuple]:
    """``model``'s tower codes as a family for ``ensemble.fit_weights``: {cap: (index, every
    user's bag)}, each code's list capped at ``cap`` items by magnitude (a tower score is
    as often negative as positive)."""
    users, items = tower_vectors(model, data, cfg)
    centres, codes = residual_codebooks(users, levels, size, seed=seed)
    bags = tower_bags(codes, centres.shape[1])
    return {cap: (index, bags) for (_, cap), index in tower_code_indexes(centres, items, caps, ["magnitude"]).items()}
