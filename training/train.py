"""Training with sampled softmax: one positive against uniformly sampled negatives,
Adam, early stopping on validation Recall@20, fixed seeds, a tqdm progress bar."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import CSR, InteractionData
from .metrics import ranking_metrics
from .models import SparCode, TwoTower


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 1024
    negatives: int = 10
    lr: float = 1e-3
    commitment: float = 1.0
    l2: float = 1e-6
    history: int = 20
    patience: int = 3
    valid_users: int = 1000
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def history_matrix(train: CSR, n_users: int, length: int, seed: int) -> np.ndarray:
    """(U, length) item ids per user, -1 padded: a seeded sample of the training items."""
    rng = np.random.default_rng(seed)
    out = np.full((n_users, length), -1, dtype=np.int64)
    for u in range(n_users):
        items = train.row(u)
        if len(items) > length:
            items = rng.choice(items, size=length, replace=False)
        out[u, : len(items)] = items
    return out


def tensors(data: InteractionData, cfg: TrainConfig) -> dict[str, torch.Tensor | None]:
    dev = cfg.device
    return {
        "history": torch.from_numpy(history_matrix(data.train, data.n_users, cfg.history, cfg.seed)).to(dev),
        "user_features": None if data.user_features is None else torch.from_numpy(data.user_features).to(dev),
        "item_features": None if data.item_features is None else torch.from_numpy(data.item_features).to(dev),
    }


def logits(model, batch_history, user_feats, candidates, item_features) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1 + negatives) scores of the positive (column 0) and negatives, and the aux loss."""
    vectors = model.items(candidates, item_features)
    if isinstance(model, TwoTower):
        users = model.user_vectors(batch_history, user_feats)
        return (model.item_vectors(vectors) * users.unsqueeze(1)).sum(-1), users.new_zeros(())
    tokens, commit = model.tokens(batch_history, user_feats)
    return model.score(tokens, vectors), commit


def fit(model: torch.nn.Module, data: InteractionData, cfg: TrainConfig, evaluate) -> dict:
    """Train ``model``; ``evaluate(model, users)`` returns validation metrics. Keeps the
    best state by validation Recall@20."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(cfg.device)
    t = tensors(data, cfg)
    users_of = np.repeat(np.arange(data.n_users), data.train.lengths)
    positives = data.train.items
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    with_valid = np.nonzero(data.valid.lengths)[0]
    valid_users = rng.choice(with_valid, size=min(cfg.valid_users, len(with_valid)), replace=False)
    embeddings = [p for n, p in model.named_parameters() if "embedding" in n or ".ids." in n]
    best, best_state, bad, history = -1.0, None, 0, []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(positives))
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"{type(model).__name__} epoch {epoch + 1}",
                   disable=not cfg.progress, unit="batch", leave=False)
        seen = 0
        for lo in bar:
            idx = order[lo : lo + cfg.batch_size]
            users = torch.from_numpy(users_of[idx]).to(cfg.device)
            pos = torch.from_numpy(positives[idx]).to(cfg.device)
            hist = t["history"][users]
            hist = torch.where(hist == pos.unsqueeze(1), torch.full_like(hist, -1), hist)  # no leaking the target
            neg = torch.randint(0, data.n_items, (len(idx), cfg.negatives), device=cfg.device)
            cand = torch.cat([pos.unsqueeze(1), neg], 1)
            ufeat = None if t["user_features"] is None else t["user_features"][users]
            scores, aux = logits(model, hist, ufeat, cand, t["item_features"])
            loss = F.cross_entropy(scores, torch.zeros(len(idx), dtype=torch.long, device=cfg.device))
            loss = loss + cfg.commitment * aux + cfg.l2 * sum(p.pow(2).sum() for p in embeddings)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(idx)
            bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{seen / max(1e-9, bar.format_dict['elapsed']):,.0f}")
        model.eval()
        metrics = evaluate(model, valid_users, data.valid)
        history.append({"epoch": epoch + 1, "valid_recall@20": metrics["recall@20"], "loss": float(loss.item())})
        if metrics["recall@20"] > best:
            best, bad = metrics["recall@20"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"epochs": len(history), "best_valid_recall@20": best, "history": history,
            "train_seconds": time.perf_counter() - start}


def full_scores(model, data: InteractionData, cfg: TrainConfig, users: np.ndarray, t: dict) -> torch.Tensor:
    """(len(users), N) scores over every item (exact; for two-tower and all-to-all)."""
    with torch.no_grad():
        vectors = model.items(torch.arange(data.n_items, device=cfg.device), t["item_features"])
        u = torch.from_numpy(users).to(cfg.device)
        ufeat = None if t["user_features"] is None else t["user_features"][u]
        if isinstance(model, TwoTower):
            return model.user_vectors(t["history"][u], ufeat) @ model.item_vectors(vectors).T
        out = []
        for lo in range(0, len(users), 64):
            tokens, _ = model.tokens(t["history"][u[lo : lo + 64]], None if ufeat is None else ufeat[lo : lo + 64])
            out.append(model.score(tokens, vectors))
        return torch.cat(out)


def rank_excluding(scores: torch.Tensor, users: np.ndarray, seen: list[CSR], k: int) -> np.ndarray:
    """Top-k item ids per user with the given CSRs' items (training interactions) removed."""
    scores = scores.clone()
    for r, u in enumerate(users):
        for csr in seen:
            scores[r, torch.from_numpy(csr.row(int(u)))] = float("-inf")
    return torch.topk(scores, k, dim=1).indices.cpu().numpy()


def validator(data: InteractionData, cfg: TrainConfig):
    """Validation Recall@20 by full ranking (train items excluded)."""
    t = tensors(data, cfg)

    def evaluate(model, users, truth):
        ranked = rank_excluding(full_scores(model, data, cfg, users, t), users, [data.train], 20)
        return ranking_metrics(ranked, truth, users, ks=(20,))

    return evaluate


def make_model(kind: str, data: InteractionData, **kwargs) -> torch.nn.Module:
    if kind == "sparcode":
        return SparCode(data, **kwargs)
    if kind == "all_to_all":
        return SparCode(data, quantize=False, **kwargs)
    if kind == "two_tower":
        return TwoTower(data, **{k: v for k, v in kwargs.items() if k in ("dim", "n_tokens")})
    raise ValueError(f"model: expected sparcode, two_tower or all_to_all, got {kind!r}")
