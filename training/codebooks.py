"""How training moves a quantizer's codebooks (``sparcode.engine.encoder``): k-means start,
EMA updates (decay 0.99, eps 1e-5), restarts of dead codewords from batch vectors, and a
straight-through forward with a commitment loss (returned; its weight is the trainer's).

The statistics live here, beside the model's encoder rather than in it, so that the
encoder saved with an index holds only what serving reads: the codebooks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparcode.engine.encoder import PerTokenQuantizer, Quantizer


class EMACodebooks(nn.Module):
    """The EMA statistics of one ``Quantizer`` and the updates that move its codebooks."""

    def __init__(self, quantizer: Quantizer, decay: float = 0.99, eps: float = 1e-5, dead_threshold: float = 1.0) -> None:
        super().__init__()
        self._quantizer = (quantizer,)  # not a submodule: its codebooks belong to the encoder's state
        self.decay, self.eps = decay, eps
        self.dead_threshold = dead_threshold  # EMA count under which a codeword is restarted
        self.register_buffer("cluster_size", torch.ones(quantizer.n_sub, quantizer.n_words))
        self.register_buffer("embed_sum", quantizer.codebooks.detach().clone())
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def quantizer(self) -> Quantizer:
        return self._quantizer[0]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantized with straight-through gradient, codes, commitment loss); in training
        mode the codebooks start from ``z`` if they have not started yet, then move."""
        q = self.quantizer
        if self.training and not bool(self.initialized):
            self.initialize(z.detach())
        words = q.assign(z.detach())
        quantized = q.lookup(words)
        commit = F.mse_loss(z, quantized.detach())
        if self.training:
            self._ema_update(z.detach(), words)
        return z + (quantized - z).detach(), q.words_to_codes(words), commit

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, words: torch.Tensor) -> None:
        q = self.quantizer
        flat, words = z.reshape(-1, q.dim), words.reshape(-1, q.n_sub)
        inputs = [q.stage_input(flat, words, p) for p in range(q.n_sub)]  # before any stage moves
        for p, x in enumerate(inputs):
            onehot = F.one_hot(words[:, p], q.n_words).to(z.dtype)  # (M, C)
            self.cluster_size[p].mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
            self.embed_sum[p].mul_(self.decay).add_(onehot.T @ x, alpha=1 - self.decay)
            n = self.cluster_size[p].sum()
            size = (self.cluster_size[p] + self.eps) / (n + q.n_words * self.eps) * n
            q.codebooks[p].copy_(self.embed_sum[p] / size.unsqueeze(1))
            dead = self.cluster_size[p] < self.dead_threshold
            if bool(dead.any()):  # restart unused codewords from this batch's vectors
                picks = torch.randint(0, x.shape[0], (int(dead.sum()),), device=z.device)
                q.codebooks[p][dead] = x[picks]
                self.embed_sum[p][dead] = x[picks]
                self.cluster_size[p][dead] = 1.0

    @torch.no_grad()
    def initialize(self, z: torch.Tensor, iters: int = 10, seed: int = 0) -> None:
        """Codebooks from k-means over token vectors ``z`` (..., dim), stage by stage: the
        first training batch's by default, or a larger sample after an unquantized warm-up."""
        q = self.quantizer
        flat = z.reshape(-1, q.dim)
        words = torch.zeros(flat.shape[0], q.n_sub, dtype=torch.int64, device=z.device)
        for p in range(q.n_sub):
            x = q.stage_input(flat, words, p)
            centers = kmeans(x, q.n_words, iters, seed=seed)
            q.codebooks[p].copy_(centers)
            self.embed_sum[p].copy_(centers)
            self.cluster_size[p].fill_(1.0)
            words[:, p] = torch.cdist(x, centers).argmin(-1)
        self.initialized.fill_(True)


class CodebookTrainer(nn.Module):
    """Training for an encoder's quantizer: one ``EMACodebooks`` for a shared quantizer,
    one per token position for a ``PerTokenQuantizer``."""

    def __init__(self, quantizer: Quantizer | PerTokenQuantizer) -> None:
        super().__init__()
        self._quantizer = (quantizer,)
        parts = quantizer.parts if isinstance(quantizer, PerTokenQuantizer) else [quantizer]
        self.stages = nn.ModuleList(EMACodebooks(part) for part in parts)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., dim) or, per token position, (..., T, dim) -> (quantized with straight-through
        gradient, codes, commitment loss (the mean over positions))."""
        quantizer = self._quantizer[0]
        if not isinstance(quantizer, PerTokenQuantizer):
            return self.stages[0](z)

        def step(t: int, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            out = self.stages[t](x)
            return out[0], out

        outs = quantizer.in_order(z, step)
        codes = torch.stack([c + t * quantizer.codes_per_token for t, (_, c, _) in enumerate(outs)], -1)
        return torch.stack([q for q, _, _ in outs], -2), codes, torch.stack([c for _, _, c in outs]).mean()

    @torch.no_grad()
    def initialize(self, z: torch.Tensor, iters: int = 10, seeds: Iterable[int] | None = None) -> None:
        """Codebooks from k-means over ``z``: each position's over that position's tokens
        (plus the error carried to it, with feedback, by the codebooks started before
        it), from the k-means seed ``seeds`` gives it (all 0 by default)."""
        quantizer = self._quantizer[0]
        if not isinstance(quantizer, PerTokenQuantizer):
            self.stages[0].initialize(z, iters)
            return
        seeds = list(seeds or [0] * len(self.stages))

        def start(t: int, x: torch.Tensor) -> tuple[torch.Tensor, None]:
            self.stages[t].initialize(x, iters, seeds[t])
            part = quantizer.parts[t]
            return part.lookup(part.assign(x)), None

        quantizer.in_order(z, start)


def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """(k, d) centres of ``x`` (n, d): faiss k-means (best of 3 starts) when faiss is
    installed and there are at least k points, else Lloyd's iterations in torch from a
    k-means++ start."""
    try:
        import faiss  # optional (the cpu extra)
    except ImportError:
        faiss = None
    if faiss is not None and x.shape[0] >= k:
        # min_points_per_centroid only sets when faiss warns (below 39 points per centre);
        # a codebook started from one batch of tokens has fewer, and the centres are the same
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, nredo=3, verbose=False, min_points_per_centroid=1)
        km.train(np.ascontiguousarray(x.detach().cpu().float().numpy()))
        return torch.from_numpy(km.centroids).to(x)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    picks = [int(torch.randint(0, x.shape[0], (1,), generator=gen))]
    nearest = torch.cdist(x, x[picks[0]].unsqueeze(0)).squeeze(1).pow(2)
    for _ in range(1, k):  # k-means++: each next start drawn in proportion to squared distance
        weights = nearest.cpu() if float(nearest.sum()) > 0 else torch.ones(x.shape[0])
        picks.append(int(torch.multinomial(weights, 1, generator=gen)))
        nearest = torch.minimum(nearest, torch.cdist(x, x[picks[-1]].unsqueeze(0)).squeeze(1).pow(2))
    centers = x[picks].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled].unsqueeze(1)
    return centers
