"""Evaluation by full ranking with training items excluded (BARS metrics). SparCode goes
through its exported index and ``Engine.search`` (what is served is what is measured);
TwoTower and AllToAll score every item exactly (AllToAll on a seeded user sample)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from sparcode.engine import Engine

from .data import CSR, InteractionData
from .metrics import ranking_metrics
from .models import SparCode
from .train import TrainConfig, full_scores, rank_excluding, tensors


def encode_users(model: SparCode, data: InteractionData, cfg: TrainConfig) -> np.ndarray:
    """(U, T) codes of every user, from their training history and features."""
    t = tensors(data, cfg)
    out = []
    with torch.no_grad():
        for lo in range(0, data.n_users, 1024):
            u = torch.arange(lo, min(data.n_users, lo + 1024), device=cfg.device)
            ufeat = None if t["user_features"] is None else t["user_features"][u]
            out.append(model.encoder.encode(t["history"][u], ufeat).cpu())
    return torch.cat(out).numpy()


def seen_items(data: InteractionData) -> list[np.ndarray]:
    """What each user already has (train and validation items), to leave out."""
    return [np.concatenate([data.train.row(u), data.valid.row(u)]) for u in range(data.n_users)]


def evaluate_index(model: SparCode, data: InteractionData, index_path: Path, cfg: TrainConfig, k: int = 50) -> dict:
    return evaluate_engine(Engine.load(index_path, device=cfg.device), encode_users(model, data, cfg), data, k)


def evaluate_engine(engine: Engine, queries: np.ndarray | tuple[np.ndarray, ...], data: InteractionData,
                    k: int = 50, split: str = "test") -> dict:
    """Every user's top k through ``engine.search`` with their (U, T) codes (from
    ``encode_users``; one encoding serves several indexes) or their bags (flat codes,
    offsets (U + 1)[, one weight per code]), train and validation items excluded, scored on the test split; or,
    with ``split="valid"``, the users with validation items, train items excluded, scored
    on their validation items (for choosing settings without reading the test split)."""
    if split not in ("test", "valid"):
        raise ValueError(f"split: expected 'test' or 'valid', got {split!r}")
    users = np.arange(data.n_users)
    seen = seen_items(data)
    truth = data.test
    if split == "valid":
        users = np.nonzero(data.valid.lengths > 0)[0]
        seen = [data.train.row(u) for u in users]
        truth = CSR.from_lists([data.valid.row(u) for u in users])
    device = engine.index.device
    if isinstance(queries, tuple):
        codes, offsets, *weights = queries
        picked = np.concatenate([np.arange(offsets[u], offsets[u + 1]) for u in users]) if users.size else np.zeros(0, int)
        starts = np.concatenate([[0], np.cumsum(offsets[users + 1] - offsets[users])])
        batch = {"batch": torch.from_numpy(codes[picked]).to(device), "offsets": torch.from_numpy(starts).to(device)}
        if weights:
            batch["weights"] = torch.from_numpy(np.ascontiguousarray(weights[0][picked], dtype=np.float32)).to(device)
    else:
        batch = {"batch": torch.from_numpy(queries[users]).to(device)}
    start = time.perf_counter()
    ids = engine.search(k=k, exclude=seen, **batch).ids.cpu().numpy()
    qps = len(users) / (time.perf_counter() - start)
    return {**ranking_metrics(ids, truth, np.arange(len(users))), "queries_per_s": qps,
            "index_bytes": engine.index.nbytes, "density": engine.index.nnz / (engine.index.n_codes * engine.index.n_items)}


def evaluate_exact(model: torch.nn.Module, data: InteractionData, cfg: TrainConfig, *, sample: int | None = None,
                   seed: int = 0, k: int = 50) -> dict:
    """Score every item for every user (or a seeded sample of ``sample`` users)."""
    users = np.arange(data.n_users)
    if sample is not None and sample < data.n_users:
        users = np.sort(np.random.default_rng(seed).choice(users, size=sample, replace=False))
    t = tensors(data, cfg)
    start = time.perf_counter()
    ranked = np.concatenate([rank_excluding(full_scores(model, data, cfg, part, t), part, [data.train, data.valid], k)
                             for part in np.array_split(users, max(1, len(users) // 1024))])
    qps = len(users) / (time.perf_counter() - start)
    return {**ranking_metrics(ranked, data.test, users), "queries_per_s": qps, "sample_users": len(users)}
