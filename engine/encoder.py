"""The query side of a SparCode model, which serving needs: tokenizer + quantizer.

``QueryEncoder`` turns a query (a user's history items and categorical features) into
T token embeddings and quantizes each with a quantizer shared by all tokens (the
paper's) or one per token position: P stages of C codewords (L2 nearest), so a token's
code is one of V = C**P (T * C**P in all with one per position). The paper's product
quantizer gives each stage a sub-vector; the residual quantizer gives each stage what
the stages before it left (less error in the same code space). The codebooks are
buffers here; how training moves them (k-means start, EMA updates, straight-through
gradients) belongs to the training package.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

R = TypeVar("R")


class Quantizer(nn.Module):
    """P stages of C codewords each; a token's code is the P-tuple of chosen codeword
    ids, one of V = C**P. Subclasses say what each stage quantizes (``stage_input``)
    and how the chosen codewords make the quantized vector (``lookup``)."""

    kind = ""

    def __init__(self, dim: int, n_sub: int, n_words: int, stage_dim: int) -> None:
        super().__init__()
        for name, value in (("n_sub", n_sub), ("n_words", n_words)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.dim, self.n_sub, self.n_words, self.stage_dim = dim, n_sub, n_words, stage_dim
        self.register_buffer("codebooks", torch.randn(n_sub, n_words, stage_dim))

    @property
    def n_codes(self) -> int:
        return self.n_words**self.n_sub

    def stage_input(self, z: torch.Tensor, words: torch.Tensor, p: int) -> torch.Tensor:
        """(M, stage_dim): what stage ``p`` quantizes, given z (M, dim) and the words of
        the stages before it (M, >= p)."""
        raise NotImplementedError

    def lookup(self, words: torch.Tensor) -> torch.Tensor:
        """(..., P) codeword ids -> (..., dim) quantized vectors."""
        raise NotImplementedError

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., P) nearest codeword per stage (L2)."""
        flat = z.reshape(-1, self.dim)
        words = torch.zeros(flat.shape[0], self.n_sub, dtype=torch.int64, device=z.device)
        for p in range(self.n_sub):
            words[:, p] = torch.cdist(self.stage_input(flat, words, p), self.codebooks[p]).argmin(-1)
        return words.reshape(*z.shape[:-1], self.n_sub)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (...) code ids in [0, C**P): sum_p word_p * C**(P-1-p)."""
        return self.words_to_codes(self.assign(z))

    def words_to_codes(self, words: torch.Tensor) -> torch.Tensor:
        """(..., P) codeword ids -> (...) code ids."""
        weights = self.n_words ** torch.arange(self.n_sub - 1, -1, -1, device=words.device)
        return (words * weights).sum(-1)

    def code_vectors(self) -> torch.Tensor:
        """(V, dim): the quantized vector of every code, in code order."""
        ids = torch.arange(self.n_codes, device=self.codebooks.device)
        words = torch.stack([(ids // self.n_words ** (self.n_sub - 1 - p)) % self.n_words for p in range(self.n_sub)], -1)
        return self.lookup(words)


class ProductQuantizer(Quantizer):
    """The paper's quantizer: the token split into P sub-vectors of dim / P, each replaced
    by its nearest codeword; the quantized token is their concatenation."""

    kind = "product"

    def __init__(self, dim: int, n_sub: int = 2, n_words: int = 64) -> None:
        if dim % n_sub:
            raise ValueError(f"dim: {dim} is not divisible by the {n_sub} sub-codebooks")
        super().__init__(dim, n_sub, n_words, dim // n_sub)

    def stage_input(self, z: torch.Tensor, words: torch.Tensor, p: int) -> torch.Tensor:
        return z[:, p * self.stage_dim : (p + 1) * self.stage_dim]

    def lookup(self, words: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.codebooks[p][words[..., p]] for p in range(self.n_sub)], dim=-1)


class ResidualQuantizer(Quantizer):
    """Residual quantization with the same code space: stage 1 quantizes the whole token,
    each next stage the residual the stages before it left; the quantized token is the
    sum of the chosen codewords. With P = 2, C = 256 (V = 65,536 either way) it left
    19% of the tokens' energy as error where the product quantizer left 31%, on a
    trained MovieLens-1M model (docs/accuracy.md): every stage sees all dimensions, so
    the codewords follow how the dimensions vary together."""

    kind = "residual"

    def __init__(self, dim: int, n_sub: int = 2, n_words: int = 64) -> None:
        super().__init__(dim, n_sub, n_words, dim)

    def stage_input(self, z: torch.Tensor, words: torch.Tensor, p: int) -> torch.Tensor:
        residual = z
        for q in range(p):
            residual = residual - self.codebooks[q][words[:, q]]
        return residual

    def lookup(self, words: torch.Tensor) -> torch.Tensor:
        return sum(self.codebooks[p][words[..., p]] for p in range(self.n_sub))


QUANTIZERS: dict[str, type[Quantizer]] = {"product": ProductQuantizer, "residual": ResidualQuantizer}


class PerTokenQuantizer(nn.Module):
    """One quantizer per token position, splitting the code space between them: token t's
    code is t * C**P + its code in quantizer t, so V = T * C**P. The T heads of the
    tokenizer say different things, and in a shared codebook they crowd each other: on
    MovieLens-1M the shared codes narrowed during training (3,618 -> 1,483 distinct over
    1,000 users) and validation fell after epoch 12, while residual 2 x 128 per position
    (the same V = 65,536) kept ~3,800 codes and led at equal epochs (validation 0.1892
    vs 0.1839 at epoch 12); trained on to its budget, Recall@50 0.3643 against 0.3336
    (docs/accuracy.md). Words carry the position first: (..., 1 + P).

    ``feedback``: each position quantizes its token plus the error the positions before
    it left (error feedback), so the errors of the T quantizations cancel in their sum
    instead of adding up; the scorer sums over tokens, so it is the sum that counts. A
    SparCode warm-started from a Gowalla two-tower (4 x 64^2 codes) kept validation
    Recall@20 0.1614 through its 1% index with it and 0.1479 without, the two-tower's
    being 0.1768; but trained on, its 1% index reached test Recall@20 0.1290 against
    0.1419 without feedback (docs/accuracy.md). Training's default leaves it off."""

    def __init__(self, kind: str, n_tokens: int, dim: int, n_sub: int, n_words: int, *, feedback: bool) -> None:
        super().__init__()
        self.parts = nn.ModuleList(QUANTIZERS[kind](dim, n_sub, n_words) for _ in range(n_tokens))
        self.kind, self.n_tokens, self.dim, self.n_sub, self.n_words = kind, n_tokens, dim, n_sub, n_words
        self.feedback = feedback

    @property
    def codes_per_token(self) -> int:
        return self.n_words**self.n_sub

    @property
    def n_codes(self) -> int:
        return self.n_tokens * self.codes_per_token

    @property
    def codebooks(self) -> torch.Tensor:
        """(T, P, C, stage_dim): every position's codebooks."""
        return torch.stack([part.codebooks for part in self.parts])

    def check(self, z: torch.Tensor) -> None:
        if z.dim() < 2 or z.shape[-2] != self.n_tokens:
            raise ValueError(f"z: expected (..., {self.n_tokens} tokens, {self.dim}), got {tuple(z.shape)}")

    def in_order(self, z: torch.Tensor, quantize: Callable[[int, torch.Tensor], tuple[torch.Tensor, R]]) -> list[R]:
        """``quantize(t, x)`` -> (the quantized x, a result) for each position t in order,
        where x is token t of z (..., T, dim), plus the error carried from the positions
        before it with ``feedback`` (no gradient flows through the carry); the results."""
        self.check(z)
        results, carry = [], None
        for t in range(self.n_tokens):
            x = z[..., t, :] if carry is None else z[..., t, :] + carry
            quantized, result = quantize(t, x)
            if self.feedback:
                carry = (x - quantized).detach()
            results.append(result)
        return results

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """(..., T, dim) -> (..., T, 1 + P): the token's position, then its codeword ids."""

        def nearest(t: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            words = self.parts[t].assign(x)
            return self.parts[t].lookup(words), words

        words = torch.stack(self.in_order(z, nearest), -2)
        position = torch.arange(self.n_tokens, device=z.device).expand(*words.shape[:-1]).unsqueeze(-1)
        return torch.cat([position, words], -1)

    def lookup(self, words: torch.Tensor) -> torch.Tensor:
        """(..., 1 + P) position and codeword ids -> (..., dim)."""
        out = torch.zeros(*words.shape[:-1], self.dim, dtype=self.parts[0].codebooks.dtype, device=words.device)
        for t, part in enumerate(self.parts):
            held = words[..., 0] == t
            out[held] = part.lookup(words[held][:, 1:])
        return out

    def words_to_codes(self, words: torch.Tensor) -> torch.Tensor:
        return words[..., 0] * self.codes_per_token + self.parts[0].words_to_codes(words[..., 1:])

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(..., T, dim) -> (..., T) code ids in [0, T * C**P)."""
        return self.words_to_codes(self.assign(z))

    def code_vectors(self) -> torch.Tensor:
        """(V, dim): position 0's codes first, in code order."""
        return torch.cat([part.code_vectors() for part in self.parts])


def make_quantizer(kind: object, dim: int, n_sub: int, n_words: int, where: str = "quantizer",
                   per_token: int | None = None, feedback: bool = False) -> Quantizer | PerTokenQuantizer:
    """The quantizer named ``kind`` ("product" or "residual"), shared by all tokens, or
    with ``per_token`` = T one for each of T token positions (with error ``feedback``
    between them); any other kind is refused with an error that names ``where``."""
    if not isinstance(kind, str) or kind not in QUANTIZERS:
        raise ValueError(f"{where}: expected one of {sorted(QUANTIZERS)}, got {kind!r}")
    if per_token is not None:
        return PerTokenQuantizer(kind, per_token, dim, n_sub, n_words, feedback=feedback)
    if feedback:
        raise ValueError(f"{where}: error feedback carries errors between token positions; it needs per-token codebooks")
    return QUANTIZERS[kind](dim, n_sub, n_words)


def embedding(rows: int, dim: int, std: float | None) -> nn.Embedding:
    """An ``nn.Embedding`` initialised N(0, std**2) (torch's N(0, 1) for None: weights that
    are loaded right after)."""
    table = nn.Embedding(rows, dim)
    if std is not None:
        nn.init.normal_(table.weight, std=std)
    return table


class WeightedBag(torch.autograd.Function):
    """sum_h weights[b, h] * table[ids[b, h]] per row b, whose gradient for ``table`` is a
    coalesced sparse tensor with one row per distinct looked-up item (weight-0 slots add
    none). ``F.embedding_bag(..., sparse=True)`` computes the same values with one row per
    slot, which the optimizer must then coalesce: a two-tower step on the synthetic set
    (1,024 histories padded to 101) spent 45% of its time filling, adding and coalescing
    those rows (Intel Xeon, 2 cores, docs/performance.md)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids, weights)
        ctx.n_rows = table.shape[0]
        return F.embedding_bag(ids, table, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        ids, weights = ctx.saved_tensors
        used = weights != 0
        rows, slots = used.nonzero(as_tuple=True)
        items, position = torch.unique(ids[rows, slots], return_inverse=True)
        values = grad.new_zeros(items.numel(), grad.shape[1])
        values.index_add_(0, position, grad[rows] * weights[rows, slots].unsqueeze(1).to(grad.dtype))
        return None, None, torch.sparse_coo_tensor(items.unsqueeze(0), values, (ctx.n_rows, grad.shape[1]),
                                                   is_coalesced=True, check_invariants=False)


class Tokenizer(nn.Module):
    """Mean-pooled history item embeddings (+ user feature embeddings) -> MLP -> T heads.

    ``history_dropout``: in training, each history item is left out of the mean with this
    probability (serving always pools the whole history). It keeps a model from learning
    any one item's pull on its co-items: on Gowalla a two-tower whose history shares the
    item table reached test Recall@20 0.137 after two epochs and fell to 0.116 after the
    third without it, and rose to 0.154 after the fourth at 0.5 (docs/accuracy.md)."""

    def __init__(self, n_items: int, user_cardinalities: list[int], *, dim: int, n_tokens: int,
                 hidden: tuple[int, ...] = (256, 256), normalize: bool = True, embedding_std: float | None = None,
                 history_dropout: float = 0.0) -> None:
        super().__init__()
        if not 0 <= history_dropout < 1:
            raise ValueError(f"history_dropout: expected a probability in [0, 1), got {history_dropout!r}")
        self.n_items, self.user_cardinalities, self.hidden = n_items, list(user_cardinalities), list(hidden)
        self.normalize, self.history_dropout = normalize, history_dropout
        self.item_embedding = embedding(n_items, dim, embedding_std)
        self.user_embeddings = nn.ModuleList(embedding(c, dim, embedding_std) for c in user_cardinalities)
        layers: list[nn.Module] = []
        width = dim * (1 + (1 if user_cardinalities else 0))
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.heads = nn.Linear(width, n_tokens * dim)
        # Standardise each token dimension over the users of a batch (running statistics
        # when serving).
        # Early in training the tokens of different users differ by a few percent of
        # their shared mean, which drifts; a codebook chasing that mean collapses to a
        # handful of codewords (seen on MovieLens-1M with C = 256: 4 codes, chance loss).
        # TwoTower, which does not quantize, leaves it out (normalize=False).
        self.norm = nn.BatchNorm1d(n_tokens * dim, affine=False) if normalize else nn.Identity()
        self.n_tokens, self.dim = n_tokens, dim

    def pool(self, history: torch.Tensor) -> torch.Tensor:
        """history (B, H) item ids, -1 padded -> (B, dim) mean of their embeddings (0 for
        none), as one weighted bag: no (B, H, dim) intermediate, and the gradient is
        sparse when the table is (``nn.Embedding.sparse``)."""
        table = self.item_embedding
        mask = (history >= 0).to(table.weight.dtype)
        if self.training and self.history_dropout:
            mask = mask * (torch.rand_like(mask) >= self.history_dropout)
        weights = mask / mask.sum(1, keepdim=True).clamp(min=1)
        if table.sparse and torch.is_grad_enabled() and table.weight.requires_grad:
            return WeightedBag.apply(history.clamp(min=0), weights, table.weight)
        return F.embedding_bag(history.clamp(min=0), table.weight, mode="sum", per_sample_weights=weights)

    def forward(self, history: torch.Tensor, user_features: torch.Tensor | None) -> torch.Tensor:
        """history (B, H) item ids, -1 padded; user_features (B, F) -> tokens (B, T, dim)."""
        parts = [self.pool(history)]
        if self.user_embeddings:
            parts.append(sum(e(user_features[:, j]) for j, e in enumerate(self.user_embeddings)))
        return self.norm(self.heads(self.mlp(torch.cat(parts, dim=1)))).view(-1, self.n_tokens, self.dim)


class QueryEncoder(nn.Module):
    """Tokenizer + quantizer: query -> T codes.

    Called on one (B, H + F) tensor of query features (what ``Engine.search`` passes
    on): the first ``history`` columns are history item ids (-1 pads), the other F are
    the user's categorical feature ids; floats are accepted and must hold integers.
    """

    def __init__(self, tokenizer: Tokenizer, quantizer: Quantizer | PerTokenQuantizer, history: int) -> None:
        super().__init__()
        self.tokenizer, self.quantizer, self.history = tokenizer, quantizer, history

    @torch.no_grad()
    def encode(self, history: torch.Tensor, user_features: torch.Tensor | None) -> torch.Tensor:
        """(B, T) int64 codes."""
        return self.quantizer.codes(self.tokenizer(history, user_features))

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, history + F) query features -> (B, T) int64 codes."""
        n_user = len(self.tokenizer.user_cardinalities)
        if features.dim() != 2 or features.shape[1] != self.history + n_user:
            raise ValueError(f"batch: expected query features of shape (B, {self.history} history items + {n_user} "
                             f"user features), got {tuple(features.shape)}")
        ints = features.to(torch.int64)
        if features.dtype.is_floating_point and not bool((ints == features).all()):
            raise ValueError("batch: query features must be whole numbers (item ids and categorical ids)")
        history, user = ints[:, : self.history], ints[:, self.history :]
        if history.numel() and (int(history.min()) < -1 or int(history.max()) >= self.tokenizer.n_items):
            raise ValueError(f"batch: history item ids must lie in [-1, {self.tokenizer.n_items}) (-1 pads)")
        for j, card in enumerate(self.tokenizer.user_cardinalities):
            column = user[:, j]
            if column.numel() and (int(column.min()) < 0 or int(column.max()) >= card):
                raise ValueError(f"batch: user feature {j} must lie in [0, {card})")
        return self.encode(history, user if n_user else None)

    def config(self) -> dict:
        """Everything needed to rebuild this module before loading its weights (JSON)."""
        tok, pq = self.tokenizer, self.quantizer
        return {"n_items": tok.n_items, "user_cardinalities": tok.user_cardinalities, "dim": tok.dim,
                "n_tokens": tok.n_tokens, "hidden": tok.hidden, "normalize": tok.normalize, "quantizer": pq.kind,
                "per_token": isinstance(pq, PerTokenQuantizer), "feedback": getattr(pq, "feedback", False),
                "n_sub": pq.n_sub, "n_words": pq.n_words,
                "history": self.history}

    @classmethod
    def from_config(cls, config: dict, where: str = "encoder") -> QueryEncoder:
        """Rebuild from ``config()``'s output; every field is type-checked (no code runs)."""
        if not isinstance(config, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")
        expected = {"n_items", "user_cardinalities", "dim", "n_tokens", "hidden", "normalize", "quantizer", "per_token",
                    "feedback", "n_sub", "n_words", "history"}
        if set(config) != expected:
            raise ValueError(f"{where}: expected fields {sorted(expected)}, got {sorted(config)}")

        def positive(value, name: str) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name}: expected a positive integer, got {value!r}")
            return value

        for name in ("user_cardinalities", "hidden"):
            if not isinstance(config[name], list):
                raise ValueError(f"{where}: {name}: expected a list of positive integers, got {config[name]!r}")
        cards = [positive(c, "user_cardinalities") for c in config["user_cardinalities"]]
        hidden = tuple(positive(h, "hidden") for h in config["hidden"])
        dim = positive(config["dim"], "dim")
        for name in ("normalize", "per_token", "feedback"):
            if not isinstance(config[name], bool):
                raise ValueError(f"{where}: {name}: expected true or false, got {config[name]!r}")
        n_tokens = positive(config["n_tokens"], "n_tokens")
        tokenizer = Tokenizer(positive(config["n_items"], "n_items"), cards, dim=dim, n_tokens=n_tokens, hidden=hidden,
                              normalize=config["normalize"])
        quantizer = make_quantizer(config["quantizer"], dim, positive(config["n_sub"], "n_sub"),
                                   positive(config["n_words"], "n_words"), f"{where}: quantizer",
                                   n_tokens if config["per_token"] else None, config["feedback"])
        return cls(tokenizer, quantizer, positive(config["history"], "history"))
