"""Training with sampled softmax: each example's positive against negatives shared by the
batch (uniform, popularity-sampled or the batch's own positives, the last two with the
log-Q correction), Adam, early stopping on validation Recall@20, an optional time budget,
fixed seeds, a tqdm progress bar."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import defaults
from .data import CSR, InteractionData
from .metrics import ranking_metrics
from .models import SparCode, TwoTower


@dataclass
class TrainConfig:
    """Training settings; every default comes from ``sparcode.training.defaults``."""

    epochs: int = defaults.EPOCHS
    batch_size: int = defaults.BATCH_SIZE
    negatives: int = defaults.NEGATIVES
    sampling: str | None = None  # uniform | popularity | in-batch; None: ``defaults.sampling`` of the model
    lr: float = defaults.LR
    commitment: float = defaults.COMMITMENT
    l2: float = defaults.L2
    history: int = defaults.HISTORY
    patience: int = defaults.PATIENCE
    valid_users: int = defaults.VALID_USERS
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    time_budget: float | None = None  # seconds of training; stops after the epoch that crosses it
    warmup: int = 0  # SparCode: epochs without quantization first (ends early at half the time budget)
    density: float | None = None  # SparCode: train for an index of this density (the bias follows a score quantile)

    def __post_init__(self) -> None:
        if self.sampling is not None and self.sampling not in defaults.SAMPLINGS:
            raise ValueError(f"sampling: expected one of {', '.join(defaults.SAMPLINGS)}, got {self.sampling!r}")
        for name in ("batch_size", "patience", "valid_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"epochs: expected >= 0 (0: the model as it starts), got {self.epochs}")
        if self.negatives < 1 and self.sampling != "in-batch":
            raise ValueError(f"negatives: expected >= 1, got {self.negatives}")
        if self.warmup and not 0 < self.warmup < self.epochs:
            raise ValueError(f"warmup: expected 0 <= warmup < epochs ({self.epochs}), got {self.warmup}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget: expected seconds > 0 (None for no budget), got {self.time_budget}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a rate > 0, got {self.lr}")
        if self.l2 < 0:
            raise ValueError(f"l2: expected a weight >= 0, got {self.l2}")
        if self.commitment < 0:
            raise ValueError(f"commitment: expected a weight >= 0, got {self.commitment}")
        if self.density is not None and not 0 < self.density < 1:
            raise ValueError(f"density: expected a fraction in (0, 1), got {self.density}")
        if self.density is not None and self.sampling not in (None, "uniform"):
            raise ValueError(f"density: the bias follows uniform negatives; sampling {self.sampling!r} is not uniform")



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


def user_side(model, history: torch.Tensor, user_feats: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """TwoTower: (B, d) user vectors; SparCode: (B, T, d) tokens. And the auxiliary loss."""
    if isinstance(model, TwoTower):
        users = model.user_vectors(history, user_feats)
        return users, users.new_zeros(())
    return model.tokens(history, user_feats)


def follow_density(model: SparCode, raw_negatives: torch.Tensor, density: float, first: bool,
                   rate: float = 0.3) -> torch.Tensor:
    """The bias that keeps ``density`` of this batch's (token, negative item) scores, as
    a function of those scores, and the model's bias moved toward it for serving.

    Uniform negatives sample the catalogue, so training sees the sparse function that
    export at this bias stores. ``fit`` adds the loss at b = 0: with the sparse loss
    alone the negatives under the cut pass almost no gradient, and MovieLens-1M at 10%
    lost 5% of Recall@50 against a model trained at b = 0 and cut at export; with both
    it tied (docs/accuracy.md). The serving bias averages about the last 1 / ``rate`` batches:
    at 0.1 it lagged scores that were still moving (a tiny synthetic run, 3 seeds,
    served 13.7-16.4% for a 10% target; 0.3 served 9.7-11.6%). The batch bias keeps its
    gradient: a shift of every score then cancels in score + bias. A detached bias let the scores drift down together and
    the bias follow without bound (bias 256, loss 10^6 within 200 steps)."""
    flat = raw_negatives.float().reshape(-1)[: 2**24]  # torch.quantile's limit
    bias = -torch.quantile(flat, 1 - density)
    with torch.no_grad():
        if first:
            model.bias.copy_(bias)
        else:
            model.bias.lerp_(bias, rate)
    return bias


def score_items(model, user: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """user side (B, ...) x item vectors (M, d) shared or (B, M, d) -> (B, M) scores."""
    if isinstance(model, TwoTower):
        items = model.item_vectors(vectors)
        return user @ items.T if items.dim() == 2 else (items * user.unsqueeze(1)).sum(-1)
    return model.score(user, vectors)


class NegativeSampler:
    """Negatives shared by a batch and the log-Q correction of the logits.

    uniform: ``negatives`` items drawn uniformly (no correction needed: Q is flat);
    popularity: drawn in proportion to training frequency; in-batch: the batch's own
    positives. The last two subtract log Q(item) from every logit, so that popular
    items are not over-penalised (Yi et al., 2019)."""

    def __init__(self, cfg: TrainConfig, train: CSR, n_items: int) -> None:
        self.cfg, self.n_items = cfg, n_items
        counts = torch.bincount(torch.from_numpy(train.items), minlength=n_items).double() + 1.0
        self.q = (counts / counts.sum()).float().to(cfg.device)
        self.log_q = self.q.log()

    def candidates(self, pos: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.sampling == "in-batch":
            return pos
        if cfg.sampling == "popularity":
            return torch.multinomial(self.q, cfg.negatives, replacement=True)
        return torch.randint(0, self.n_items, (cfg.negatives,), device=cfg.device)

    def loss(self, pos_scores: torch.Tensor, neg_scores: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Softmax cross-entropy of each positive (B,) against the shared negatives (B, M)."""
        if self.cfg.sampling != "uniform":
            pos_scores = pos_scores - self.log_q[pos]
            neg_scores = neg_scores - self.log_q[neg]
        neg_scores = neg_scores.masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), float("-inf"))  # not its own positive
        logits = torch.cat([pos_scores.unsqueeze(1), neg_scores], 1)
        return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=logits.device))


@torch.no_grad()
def start_quantizing(model: SparCode, t: dict, cfg: TrainConfig, rng: np.random.Generator, sample: int = 16384) -> None:
    """End the warm-up: codebooks from k-means over the tokens of a sample of users (the
    tokenizer has learned what to say by now, so the codewords start where the tokens are)."""
    users = torch.from_numpy(np.sort(rng.choice(len(t["history"]), size=min(sample, len(t["history"])), replace=False)))
    users = users.to(cfg.device)
    model.eval()
    z = model.encoder.tokenizer(t["history"][users], None if t["user_features"] is None else t["user_features"][users])
    model.codebook_trainer.initialize(z)
    model.quantize = True


@torch.no_grad()
def distinct_codes(model: SparCode, t: dict, users: np.ndarray, cfg: TrainConfig) -> int:
    """How many distinct codes the validation users' tokens take: a falling count is a
    codebook collapsing (on Gowalla SparCode's validation fell while AllToAll's rose)."""
    u = torch.from_numpy(users).to(cfg.device)
    codes = model.encoder.encode(t["history"][u], None if t["user_features"] is None else t["user_features"][u])
    return int(torch.unique(codes).numel())


def make_optimizers(model: torch.nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    """Adam for the dense parameters and a lazy Adam (``SparseAdam``) for the embedding
    tables, whose gradients become sparse: a step then touches only the rows its batch
    looked up. Dense gradients over every row made Adam's passes over the two 40,981 x 64
    Gowalla tables most of a TwoTower step (0.25-0.29 s per batch of 1,024 on 2 CPU cores;
    0.077 s with sparse updates, docs/performance.md)."""
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    for table in tables:
        table.sparse = True
    sparse = {id(table.weight) for table in tables}
    groups = ([p for p in model.parameters() if id(p) in sparse], [p for p in model.parameters() if id(p) not in sparse])
    return [kind(params, lr=lr) for kind, params in zip((torch.optim.SparseAdam, torch.optim.Adam), groups) if params]


def fit(model: torch.nn.Module, data: InteractionData, cfg: TrainConfig, evaluate, measure_start: bool = False) -> dict:
    """Train ``model``; ``evaluate(model, users)`` returns validation metrics. Keeps the
    best state by validation Recall@20.

    SparCode with ``cfg.warmup`` trains unquantized first (the all-to-all model), then
    starts its codebooks from the learned tokens (on synthetic data with C = 64,
    quantized training from the start learned 3.5x slower than AllToAll over the first
    6 epochs; docs/accuracy.md has where it helped and where not). Warm-up epochs are recorded
    but neither kept as the best state nor counted for early stopping. ``measure_start``:
    validate before the first step too (epoch 0; a warm-started model's starting point).
    With ``cfg.epochs`` 0 the model stays as it starts, and the best validation is the
    start's."""
    if cfg.sampling is None:
        cfg = replace(cfg, sampling=defaults.sampling(model_kind(model), cfg.density))
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(cfg.device)
    t = tensors(data, cfg)
    users_of = np.repeat(np.arange(data.n_users), data.train.lengths)
    positives = data.train.items
    optimizers = make_optimizers(model, cfg.lr)
    sampler = NegativeSampler(cfg, data.train, data.n_items)
    with_valid = np.nonzero(data.valid.lengths)[0]
    valid_users = rng.choice(with_valid, size=min(cfg.valid_users, len(with_valid)), replace=False)
    best, best_state, bad, history = -1.0, None, 0, []
    quantized = isinstance(model, SparCode) and model.quantize  # AllToAll (the upper bound) is neither
    warm = cfg.warmup if quantized else 0
    sparse = quantized and cfg.density is not None
    if warm:
        model.quantize = False
    if measure_start:
        model.eval()
        history.append({"epoch": 0, "valid_recall@20": evaluate(model, valid_users, data.valid)["recall@20"]})
        if not cfg.epochs:
            best = history[0]["valid_recall@20"]
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        if warm and (epoch == warm or (cfg.time_budget is not None and time.perf_counter() - start >= cfg.time_budget / 2)):
            start_quantizing(model, t, cfg, rng)
            warm = 0
        model.train()
        order = rng.permutation(len(positives))
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"{type(model).__name__} epoch {epoch + 1}",
                   disable=not cfg.progress, unit="batch", leave=False)
        seen, loss_sum = 0, torch.zeros((), device=cfg.device)
        for step, lo in enumerate(bar):
            idx = order[lo : lo + cfg.batch_size]
            users = torch.from_numpy(users_of[idx]).to(cfg.device)
            pos = torch.from_numpy(positives[idx]).to(cfg.device)
            hist = t["history"][users]
            hist = torch.where(hist == pos.unsqueeze(1), torch.full_like(hist, -1), hist)  # no leaking the target
            neg = sampler.candidates(pos)
            ufeat = None if t["user_features"] is None else t["user_features"][users]
            user, aux = user_side(model, hist, ufeat)
            pos_vectors = model.items(pos, t["item_features"]).unsqueeze(1)
            neg_vectors = model.items(neg, t["item_features"])
            if sparse:
                raw_pos, raw_neg = model.raw(user, pos_vectors), model.raw(user, neg_vectors)
                bias = follow_density(model, raw_neg, cfg.density, first=epoch == 0 and step == 0)
                pos_scores, neg_scores = model.activate(raw_pos, bias)[:, 0], model.activate(raw_neg, bias)
                zero = torch.zeros((), device=cfg.device)  # plus the dense loss: every negative still teaches
                dense = sampler.loss(model.activate(raw_pos, zero)[:, 0], model.activate(raw_neg, zero), pos, neg)
            else:
                dense = 0.0
                pos_scores = score_items(model, user, pos_vectors)[:, 0]
                neg_scores = score_items(model, user, neg_vectors)
            loss = sampler.loss(pos_scores, neg_scores, pos, neg) + dense
            loss = loss + cfg.commitment * aux + cfg.l2 * (pos_vectors.pow(2).sum() + neg_vectors.pow(2).sum()) / len(idx)
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            seen += len(idx)
            loss_sum += loss.detach()
            if cfg.progress and step % 20 == 0:  # reading the loss waits for the device: not every step
                bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{seen / max(1e-9, bar.format_dict['elapsed']):,.0f}")
        model.eval()
        metrics = evaluate(model, valid_users, data.valid)
        history.append({"epoch": epoch + 1, "valid_recall@20": metrics["recall@20"],
                        "loss": float(loss_sum) / max(1, step + 1)})  # mean training loss of the epoch
        if isinstance(model, SparCode) and model.quantize:
            history[-1]["distinct_codes"] = distinct_codes(model, t, valid_users, cfg)
        if warm:
            history[-1]["warmup"] = True
            continue
        if metrics["recall@20"] > best:
            best, bad = metrics["recall@20"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
        if cfg.time_budget is not None and time.perf_counter() - start >= cfg.time_budget:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"epochs": sum(entry["epoch"] > 0 for entry in history), "best_valid_recall@20": best, "history": history,
            "train_seconds": time.perf_counter() - start}


def full_scores(model, data: InteractionData, cfg: TrainConfig, users: np.ndarray, t: dict,
                budget_bytes: int | None = None) -> torch.Tensor:
    """(len(users), N) scores over every item (exact; for two-tower and all-to-all), the
    scorer run on as many token rows at a time as ``budget_bytes`` of activations allow.

    A quantized SparCode scores each distinct code once and adds its scores to every
    user whose tokens take it: users share codes (on MovieLens-1M 1,300-2,200 distinct
    codes for 1,000 users x 4 tokens), and the sum over tokens of the activated scores
    is the same either way."""
    with torch.no_grad():
        vectors = model.items(torch.arange(data.n_items, device=cfg.device), t["item_features"])
        u = torch.from_numpy(users).to(cfg.device)
        ufeat = None if t["user_features"] is None else t["user_features"][u]
        if isinstance(model, TwoTower):
            return model.user_vectors(t["history"][u], ufeat) @ model.item_vectors(vectors).T
        width = model.scorer.token_in.out_features + vectors.shape[1]
        budget_bytes = budget_bytes or (4 * 2**30 if vectors.is_cuda else 2**30)
        rows = max(1, budget_bytes // (data.n_items * width * 4 * 3))  # token rows per scorer call
        if model.quantize:
            encoder = model.encoder
            return code_scores(model, encoder.quantizer.assign(encoder.tokenizer(t["history"][u], ufeat)), vectors, rows)
        n_tokens = model.encoder.tokenizer.n_tokens
        step = max(1, rows // n_tokens)
        out = []
        for lo in range(0, len(users), step):
            tokens, _ = model.tokens(t["history"][u[lo : lo + step]], None if ufeat is None else ufeat[lo : lo + step])
            out.append(model.score(tokens, vectors))
        return torch.cat(out)


def code_scores(model: SparCode, words: torch.Tensor, vectors: torch.Tensor, rows: int) -> torch.Tensor:
    """Codeword ids (B, T, P) -> (B, N) scores: each distinct code's vector (exactly
    what export scores) through the scorer once, ``rows`` codes at a time, its activated
    scores added to the users that hold it."""
    n_users, n_tokens, n_sub = words.shape
    distinct, inverse, counts = torch.unique(words.reshape(-1, n_sub), dim=0, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse)  # token rows grouped by code
    bounds = [0, *counts.cumsum(0).tolist()]
    code_vectors = model.encoder.quantizer.lookup(distinct)  # (codes, d)
    out = torch.zeros(n_users, len(vectors), device=words.device)
    for lo in range(0, len(distinct), rows):
        hi = min(lo + rows, len(distinct))
        scores = model.activate(model.raw(code_vectors[lo:hi].unsqueeze(1), vectors))  # (codes, N)
        held = order[bounds[lo] : bounds[hi]]
        out.index_add_(0, held // n_tokens, scores[inverse[held] - lo])
    return out


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


def model_kind(model: torch.nn.Module) -> str:
    """"two_tower", "sparcode" or "all_to_all" (a SparCode that does not quantize)."""
    if isinstance(model, TwoTower):
        return "two_tower"
    return "sparcode" if model.quantize else "all_to_all"


TWO_TOWER_KWARGS = ("dim", "n_tokens", "embedding_std", "temperature", "tokenizer_hidden", "history_dropout")


def make_model(kind: str, data: InteractionData, **kwargs) -> torch.nn.Module:
    """The model ``kind`` with the keyword arguments that apply to it: TwoTower takes
    ``TWO_TOWER_KWARGS`` and ignores the scorer's and quantizer's; the all-to-all models
    take everything but temperature and history dropout."""
    if kind in ("sparcode", "all_to_all"):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("temperature", "history_dropout")}
    if kind == "sparcode":
        return SparCode(data, **kwargs)
    if kind == "all_to_all":
        return SparCode(data, quantize=False, **kwargs)
    if kind == "two_tower":
        return TwoTower(data, **{k: v for k, v in kwargs.items() if k in TWO_TOWER_KWARGS})
    raise ValueError(f"model: expected sparcode, two_tower or all_to_all, got {kind!r}")
