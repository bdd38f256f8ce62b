"""SparCode, its two-tower baseline and its all-to-all upper bound, sharing one tokenizer
design (``sparcode.engine.encoder``) and one item side."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparcode.engine.encoder import ProductQuantizer, QueryEncoder, Tokenizer

from .data import InteractionData


class ItemTower(nn.Module):
    """Item id embedding + categorical feature embeddings -> (N, dim)."""

    def __init__(self, n_items: int, cardinalities: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.ids = nn.Embedding(n_items, dim)
        self.features = nn.ModuleList(nn.Embedding(c, dim) for c in cardinalities)

    def forward(self, items: torch.Tensor, item_features: torch.Tensor | None) -> torch.Tensor:
        out = self.ids(items)
        for j, emb in enumerate(self.features):
            out = out + emb(item_features[items, j])
        return out


class Scorer(nn.Module):
    """The all-to-all scorer: an MLP over [token ; item vector] -> one score. The first
    layer is split into a token part and an item part, so each is computed once."""

    def __init__(self, dim: int, hidden: tuple[int, ...] = (256, 256, 256)) -> None:
        super().__init__()
        self.token_in = nn.Linear(dim, hidden[0])
        self.item_in = nn.Linear(dim, hidden[0], bias=False)
        layers: list[nn.Module] = []
        for a, b in zip(hidden[:-1], hidden[1:]):
            layers += [nn.ReLU(), nn.Linear(a, b)]
        self.rest = nn.Sequential(*layers, nn.ReLU(), nn.Linear(hidden[-1], 1))

    def pair(self, token_part: torch.Tensor, item_part: torch.Tensor) -> torch.Tensor:
        """token_part (..., T, 1, h) + item_part (..., 1, M, h) -> raw scores (..., T, M)."""
        return self.rest(token_part + item_part).squeeze(-1)


class SparCode(nn.Module):
    """score(q, i) = sum over tokens of ReLU(scorer(quantized token, item) + bias)."""

    def __init__(self, data: InteractionData, *, dim: int = 64, n_tokens: int = 4, n_sub: int = 2, n_words: int = 64,
                 hidden: tuple[int, ...] = (256, 256, 256), bias: float = 0.0, quantize: bool = True) -> None:
        super().__init__()
        tokenizer = Tokenizer(data.n_items, list(data.user_cardinalities), dim=dim, n_tokens=n_tokens)
        self.encoder = QueryEncoder(tokenizer, ProductQuantizer(dim, n_sub, n_words))
        self.items = ItemTower(data.n_items, data.item_cardinalities, dim)
        self.scorer = Scorer(dim, hidden)
        self.bias, self.quantize = bias, quantize

    def tokens(self, history: torch.Tensor, user_features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(token vectors (B, T, d), commitment loss)."""
        z = self.encoder.tokenizer(history, user_features)
        if not self.quantize:
            return z, z.new_zeros(())
        quantized, _, commit = self.encoder.quantizer(z)
        return quantized, commit

    def score(self, tokens: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, d), item_vectors (B, M, d) or (M, d) -> (B, M).

        In training mode the ReLU leaks (slope 0.01): once every (token, item) score of
        a batch is under the bias, a plain ReLU passes no gradient at all and training
        stalls, seen on the synthetic demo (an all-zero index after 4 epochs). Serving
        and export use the plain ReLU, which is what makes the index sparse.
        """
        token_part = self.scorer.token_in(tokens).unsqueeze(-2)  # (B, T, 1, h)
        item_part = self.scorer.item_in(item_vectors)
        item_part = item_part.unsqueeze(-3) if item_part.dim() == 3 else item_part[None, None]
        raw = self.scorer.pair(token_part, item_part) + self.bias
        return (F.leaky_relu(raw, 0.01) if self.training else torch.relu(raw)).sum(1)


class TwoTower(nn.Module):
    """The same tokenizer, its T tokens mean-pooled into one user vector, dot an item tower."""

    def __init__(self, data: InteractionData, *, dim: int = 64, n_tokens: int = 4) -> None:
        super().__init__()
        self.tokenizer = Tokenizer(data.n_items, list(data.user_cardinalities), dim=dim, n_tokens=n_tokens)
        self.items = ItemTower(data.n_items, data.item_cardinalities, dim)
        self.item_mlp = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, dim))

    def user_vectors(self, history: torch.Tensor, user_features: torch.Tensor | None) -> torch.Tensor:
        return self.tokenizer(history, user_features).mean(1)

    def item_vectors(self, item_vectors: torch.Tensor) -> torch.Tensor:
        return self.item_mlp(item_vectors)
