"""Small indexes for tests."""

from __future__ import annotations

import torch

from sparcode.engine import CodeIndex
from sparcode.engine.synthetic import random_index

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where device-agnostic tests run: the GPU when there is one


def quantized_index(n_codes: int, n_items: int, mean_postings: float, *, seed: int, dtype=torch.float16,
                    negative: bool = False, **kwargs) -> CodeIndex:
    """A random index whose scores are multiples of 1/8, so that every sum is exact in
    float32 whatever the order of addition: backends must then agree bit for bit,
    ties included (and ties are frequent)."""
    base = random_index(n_codes, n_items, mean_postings, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    low = -16 if negative else 1
    steps = torch.randint(low, 33, (base.nnz,), generator=gen)
    scores = (steps.to(torch.float32) / 8).to(dtype)
    return CodeIndex.from_postings(base.indptr, base.items, scores, n_items, **kwargs)


def csr_index(lists: list[list[tuple[int, float]]], n_items: int, **kwargs) -> CodeIndex:
    """An index from explicit posting lists [[(item, score), ...] per code]."""
    indptr = [0]
    items, scores = [], []
    for plist in lists:
        items += [i for i, _ in plist]
        scores += [s for _, s in plist]
        indptr.append(len(items))
    return CodeIndex.from_postings(
        torch.tensor(indptr, dtype=torch.int64), torch.tensor(items, dtype=torch.int32),
        torch.tensor(scores, dtype=torch.float32), n_items, **kwargs,
    )
