"""SparCode, its two-tower baseline and its all-to-all upper bound, sharing one tokenizer
design (``sparcode.engine.encoder``) and one item side."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparcode.engine.encoder import QueryEncoder, Tokenizer, embedding, make_quantizer

from . import defaults
from .codebooks import CodebookTrainer
from .data import InteractionData


class ItemTower(nn.Module):
    """Item id embedding + categorical feature embeddings -> (N, dim)."""

    def __init__(self, n_items: int, cardinalities: tuple[int, ...], dim: int, std: float = defaults.EMBEDDING_STD) -> None:
        super().__init__()
        self.ids = embedding(n_items, dim, std)
        self.features = nn.ModuleList(embedding(c, dim, std) for c in cardinalities)

    def forward(self, items: torch.Tensor, item_features: torch.Tensor | None) -> torch.Tensor:
        out = self.ids(items)
        for j, emb in enumerate(self.features):
            out = out + emb(item_features[items, j])
        return out


class Scorer(nn.Module):
    """The all-to-all scorer: an MLP over [token ; item ; token * item] -> one score, plus
    the plain dot product <token, item> as a residual.

    The product input and the dot residual are ours, not the paper's: an MLP learns a
    dot product only slowly (Rendle et al., 2020), and with them the scorer starts from
    what a two-tower model can express and the MLP learns the rest. The first layer is split into a token part, an item
    part and the product part, so export computes the first two once per code and once
    per item; for items shared by a batch the product part folds into one matmul
    (``fold_side``).
    """

    def __init__(self, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.token_in = nn.Linear(dim, hidden[0])
        self.item_in = nn.Linear(dim, hidden[0], bias=False)
        self.product_in = nn.Linear(dim, hidden[0], bias=False)
        self.dot_scale = dim**-0.5  # unit-variance tokens: the dot is then on the scale of an item embedding entry
        layers: list[nn.Module] = []
        for a, b in zip(hidden[:-1], hidden[1:]):
            layers += [nn.ReLU(), nn.Linear(a, b)]
        self.rest = nn.Sequential(*layers, nn.ReLU(), nn.Linear(hidden[-1], 1))
        # start as the dot product alone; the MLP learns what it cannot express
        nn.init.zeros_(self.rest[-1].weight)
        nn.init.zeros_(self.rest[-1].bias)

    def mlp_is_constant(self) -> bool:
        """Whether the MLP's output layer has all-zero weights (a warm start not trained
        yet, a converted two-tower): every score is then the dot product plus the output
        bias, and scoring a whole catalogue (export) skips the MLP."""
        return not bool(self.rest[-1].weight.any())

    def dot(self, tokens: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The dot residual, tokens (..., T, d) against items (M, d) or (..., M, d) -> (..., T, M)."""
        return tokens @ items.transpose(-1, -2) * self.dot_scale  # a matmul, not a sum over a product

    def forward(self, tokens: torch.Tensor, items: torch.Tensor, token_part: torch.Tensor | None = None,
                item_part: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T, d) with items (M, d) shared by the batch or (B, M, d) per query
        -> raw scores (B, T, M). ``token_part`` / ``item_part``: precomputed first-layer
        halves (export passes them to avoid recomputing per chunk)."""
        dot = self.dot(tokens, items)  # (B, T, M)
        side = self.fold_side(tokens, items, given=token_part is not None or item_part is not None)
        if side == "tokens":
            token_part = self.token_in(tokens) if token_part is None else token_part
            hidden = self._fold_tokens(tokens.reshape(-1, tokens.shape[-1]), items,
                                       token_part.reshape(-1, token_part.shape[-1]), item_part)  # (M, B T, h)
            return self.rest(hidden).squeeze(-1).T.reshape(dot.shape) + dot
        item_part = self.item_in(items) if item_part is None else item_part
        if side == "items":
            hidden = self._fold_items(tokens, items) + (item_part + self.token_in.bias)
        else:
            token_part = self.token_in(tokens) if token_part is None else token_part
            i, ip = items.unsqueeze(-3), item_part.unsqueeze(-3)  # (B, 1, M, d), (B, 1, M, h)
            hidden = token_part.unsqueeze(-2) + ip + self.product_in(tokens.unsqueeze(-2) * i)
        return self.rest(hidden).squeeze(-1) + dot

    def fold_side(self, tokens: torch.Tensor, items: torch.Tensor, given: bool = False) -> str | None:
        """How the first layer is computed. Items shared by the batch fold the product
        part into a matmul over the side with fewer rows, whose (rows, d, h) weights are
        then the smallest tensor: "items" for training's shared negatives (many token
        rows, few items), "tokens" for scoring whole catalogues (validation, export:
        few token rows, many items; also whenever precomputed halves are ``given``).
        Per-query items (B, M, d) take the explicit (B, T, M, d) product (None)."""
        if items.dim() != 2:
            return None
        return "tokens" if given or len(items) > tokens.shape[:-1].numel() else "items"

    def _fold_items(self, tokens: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """token_in(t) + product_in(t * i) less the bias, for shared items as one matmul, t @ (W_token +
        i_m * W_product) for each item m: the same arithmetic without the (B, T, M, d)
        product or its elementwise passes (training's shared negatives; the scorer's
        training step with hidden (64, 64) went 1.75x faster on 2 CPU cores, docs/performance.md)."""
        d, h = self.token_in.in_features, self.token_in.out_features
        weights = self.token_in.weight.T + items.unsqueeze(-1) * self.product_in.weight.T  # (M, d, h)
        flat = tokens.reshape(-1, d) @ weights.permute(1, 0, 2).reshape(d, -1)  # (B T, M h)
        return flat.view(*tokens.shape[:-1], len(items), h)

    def _fold_tokens(self, tokens: torch.Tensor, items: torch.Tensor, token_part: torch.Tensor,
                     item_part: torch.Tensor | None) -> torch.Tensor:
        """The first layer's output for R token rows (R, d) against M shared items as
        (M, R, h): item_in(i) + product_in(t_r * i) = i @ (W_item + t_r * W_product), one
        matmul of the items against every row's weights (R, d, h), plus the token part.
        Laid out item-major so that the matmul's output needs no copy; the rest of the
        MLP works on the last dimension and does not care."""
        d, h = self.token_in.in_features, self.token_in.out_features
        weights = tokens.unsqueeze(-1) * self.product_in.weight.T  # (R, d, h)
        if item_part is None:
            weights = weights + self.item_in.weight.T
        hidden = (items @ weights.permute(1, 0, 2).reshape(d, -1)).view(len(items), len(tokens), h) + token_part
        return hidden if item_part is None else hidden + item_part.unsqueeze(1)


class SparCode(nn.Module):
    """score(q, i) = sum over tokens of ReLU(scorer(quantized token, item) + bias)."""

    def __init__(self, data: InteractionData, *, dim: int = defaults.DIM, n_tokens: int = defaults.TOKENS,
                 n_sub: int = defaults.SUB_CODEBOOKS, n_words: int = defaults.CPU_CODEWORDS,
                 hidden: tuple[int, ...] = defaults.CPU_HIDDEN, bias: float = 0.0, quantize: bool = True,
                 embedding_std: float = defaults.EMBEDDING_STD, quantizer: str = defaults.QUANTIZER,
                 per_token: bool = defaults.PER_TOKEN, feedback: bool = defaults.FEEDBACK,
                 tokenizer_hidden: tuple[int, ...] = defaults.TOKENIZER_HIDDEN,
                 normalize_tokens: bool = True) -> None:
        super().__init__()
        tokenizer = Tokenizer(data.n_items, list(data.user_cardinalities), dim=dim, n_tokens=n_tokens,
                              hidden=tuple(tokenizer_hidden), normalize=normalize_tokens, embedding_std=embedding_std)
        self.encoder = QueryEncoder(tokenizer, make_quantizer(quantizer, dim, n_sub, n_words,
                                                              per_token=n_tokens if per_token else None,
                                                              feedback=feedback),
                                    history=defaults.HISTORY)
        self.codebook_trainer = CodebookTrainer(self.encoder.quantizer)
        self.items = ItemTower(data.n_items, data.item_cardinalities, dim, embedding_std)
        self.scorer = Scorer(dim, tuple(hidden))
        self.register_buffer("bias", torch.tensor(float(bias)))  # a buffer: training may move it, checkpoints keep it
        self.quantize = quantize

    def tokens(self, history: torch.Tensor, user_features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(token vectors (B, T, d), commitment loss)."""
        z = self.encoder.tokenizer(history, user_features)
        if not self.quantize:
            return z, z.new_zeros(())
        quantized, _, commit = self.codebook_trainer(z)
        return quantized, commit

    def raw(self, tokens: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, d), item_vectors (B, M, d) or (M, d) -> scorer outputs (B, T, M)."""
        return self.scorer(tokens, item_vectors)

    def activate(self, raw: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Raw scores (B, T, M) -> (B, M): the sum over tokens of the activation at the
        bias (the model's, or ``bias``: training for a target density passes the batch's).

        Training uses softplus, serving and export the plain ReLU (what makes the index
        sparse). A plain ReLU in training stalls once every (token, item) score of a
        batch is under the bias (seen: an all-zero index after 4 epochs on synthetic
        data). A leaky ReLU was worse: the model learned to rank in the negative region,
        which serving cuts to 0 (seen on MovieLens-1M: loss falling, every served score 0).
        Softplus passes a gradient everywhere but saturates at 0 below, so nothing can be
        ranked there; it differs from the ReLU by at most log 2, at 0.
        """
        raw = raw + (self.bias if bias is None else bias)
        return (F.softplus(raw) if self.training else torch.relu(raw)).sum(1)

    def score(self, tokens: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, d), item_vectors (B, M, d) or (M, d) -> (B, M)."""
        return self.activate(self.raw(tokens, item_vectors))


class TwoTower(nn.Module):
    """A user vector from the tokenizer (without the normalisation that only quantization
    needs; its T heads mean-pooled), scored against the item tower's vector by cosine
    similarity over a temperature (YoutubeDNN's form as BARS runs it).

    Both vectors are L2-normalised and the user's is divided by ``temperature``, so the
    score is still one inner product (exact MIPS serves it) but its range is bounded.
    The history is pooled from the item tower's own id table (one table, as in SimpleX)
    through one linear map, with history dropout in training: on Gowalla (2 CPU cores,
    in-batch negatives) the default (128 dimensions, rate 2e-3) reaches test Recall@20
    0.1736 in 20 epochs (1,103 s; bench/results/accuracy-gowalla.json); at 64 dimensions
    it levels off at ~0.165 (docs/accuracy.md). Items with features pass id + feature embeddings through an MLP
    (dim-256-dim), which can cross them; an id alone goes straight in, as an MLP over
    a free table only reparametrises it (on the synthetic data, with features, dropping
    the MLP cost a third)."""

    def __init__(self, data: InteractionData, *, dim: int = defaults.TWO_TOWER_DIM, n_tokens: int = defaults.TOKENS,
                 temperature: float = defaults.TEMPERATURE, embedding_std: float = defaults.EMBEDDING_STD,
                 tokenizer_hidden: tuple[int, ...] = defaults.TWO_TOWER_TOKENIZER_HIDDEN,
                 history_dropout: float = defaults.TWO_TOWER_HISTORY_DROPOUT) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        self.tokenizer = Tokenizer(data.n_items, list(data.user_cardinalities), dim=dim, n_tokens=n_tokens, normalize=False,
                                   hidden=tuple(tokenizer_hidden), embedding_std=embedding_std,
                                   history_dropout=history_dropout)
        self.items = ItemTower(data.n_items, data.item_cardinalities, dim, std=embedding_std)
        self.tokenizer.item_embedding = self.items.ids  # one item table for the history and the items
        self.item_mlp = (nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, dim)) if data.item_cardinalities
                         else nn.Identity())
        self.temperature = temperature

    def user_vectors(self, history: torch.Tensor, user_features: torch.Tensor | None) -> torch.Tensor:
        users = self.tokenizer(history, user_features).mean(1)
        return F.normalize(users, dim=-1) / self.temperature

    def item_vectors(self, item_vectors: torch.Tensor) -> torch.Tensor:
        items = self.item_mlp(item_vectors)
        return F.normalize(items, dim=-1)
