"""Seeded synthetic indexes and queries with Zipf-like skew, for tests and benchmarks.

Code popularity follows one ranking per V (a fixed permutation of the codes), shared by
``random_index`` and ``random_codes``: the codes with long posting lists are also the
codes that queries use most, as in a trained model. Item popularity is skewed too.
"""

from __future__ import annotations

import torch

from .index import CodeIndex

_POPULARITY_SEED = 20230723


def code_popularity(n_codes: int, skew: float) -> torch.Tensor:
    """Zipf weights (sum 1) over codes, in a fixed permuted order for this V."""
    ranks = torch.randperm(n_codes, generator=torch.Generator().manual_seed(_POPULARITY_SEED))
    weights = (ranks.to(torch.float64) + 1.0).pow(-skew)
    return weights / weights.sum()


def random_index(
    n_codes: int,
    n_items: int,
    mean_postings: float,
    *,
    skew: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    n_tokens: int | None = None,
) -> CodeIndex:
    """An index with about ``mean_postings`` items per code on average.

    Posting lengths follow the code popularity (skew 0: all equal); items are drawn with
    a power-law popularity (skew 0: uniform) and deduplicated within a list; scores are
    uniform in (0.01, 1]. It is generated on ``device`` (big indexes build in seconds on
    a GPU); the same arguments on the same kind of device give the same index.
    """
    if n_codes < 1 or n_items < 1 or mean_postings < 0:
        raise ValueError("n_codes and n_items must be >= 1 and mean_postings >= 0")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = code_popularity(n_codes, skew).to(device)
    lengths = (weights * n_codes * mean_postings).round().clamp(max=n_items).to(torch.int64)
    codes = torch.repeat_interleave(torch.arange(n_codes, device=device), lengths)
    items = _skewed_items(codes.numel(), n_items, skew, gen)
    keys = torch.unique(codes * n_items + items)
    del codes, items
    items = (keys % n_items).to(torch.int32)
    indptr = torch.zeros(n_codes + 1, dtype=torch.int64, device=device)
    indptr[1:] = torch.bincount(keys // n_items, minlength=n_codes).cumsum(0)
    del keys
    scores = (torch.rand(items.numel(), generator=gen, device=device) * 0.99 + 0.01).to(dtype)
    return CodeIndex.from_postings(indptr, items, scores, n_items, n_tokens=n_tokens)


def random_codes(
    n_queries: int,
    n_tokens: int,
    n_codes: int,
    *,
    skew: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n_queries, n_tokens) int64 codes drawn from the code popularity."""
    gen = torch.Generator().manual_seed(seed)
    weights = code_popularity(n_codes, skew)
    if n_queries * n_tokens == 0:
        return torch.empty((n_queries, n_tokens), dtype=torch.int64, device=device)
    codes = torch.multinomial(weights, n_queries * n_tokens, replacement=True, generator=gen)
    return codes.reshape(n_queries, n_tokens).to(device)  # drawn on the CPU: same codes on any device


def _skewed_items(count: int, n_items: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    """``count`` item ids with a power-law popularity over a seeded item order."""
    u = torch.rand(count, generator=gen, dtype=torch.float64, device=gen.device)
    ranks = (u.pow(1.0 + skew) * n_items).to(torch.int64).clamp(max=n_items - 1)
    order = torch.randperm(n_items, generator=gen, device=gen.device)
    return order[ranks]
