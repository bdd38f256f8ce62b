"""The Triton backend: the search kernels of ``sparcode.kernels`` with a regime choice.

On CUDA it is the default. On CPU it runs only under the Triton interpreter
(``TRITON_INTERPRET=1``), which is what the tests do with tiny shapes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sparcode.kernels.candidate_search import candidate_search
from sparcode.kernels.tiled_search import tiled_search

from .index import CodeIndex
from .plan import Plan
from .selection import Exclusion

TILE_ITEMS = 1024
REGIMES = ("auto", "candidate", "tiled")


def choose_regime(n_items: int, n_tokens: int, mean_postings: float, longest: int, tile_items: int = TILE_ITEMS) -> str:
    """Pick the cheaper regime from a count of memory operations per query.

    candidate: every posting binary-searches all T lists (T x log2 L loads) and is
    written once as a key. tiled: every posting is a read-modify-write of the scratch
    row, and every item slot costs an init, a read-back and its share of the on-chip
    sort. The constants are first guesses, to be calibrated on a GPU (docs/performance.md).
    """
    steps = max(1, longest.bit_length())
    candidate = mean_postings * (n_tokens * steps + 2)
    tiled = mean_postings * 3 + n_items * (3 + math.log2(tile_items) / 2)
    return "candidate" if candidate <= tiled else "tiled"


class TritonBackend:
    """Gather-and-sum in Triton, then ``torch.topk`` over packed keys."""

    name = "triton"

    def __init__(self, regime: str = "auto", tile_items: int = TILE_ITEMS) -> None:
        if regime not in REGIMES:
            raise ValueError(f"regime: expected one of {REGIMES}, got {regime!r}")
        if tile_items < 16 or tile_items & (tile_items - 1):
            raise ValueError(f"tile_items: expected a power of two >= 16, got {tile_items}")
        self.regime = regime
        self.tile_items = tile_items

    def plan(self, index: CodeIndex, codes: torch.Tensor, k: int) -> Plan:
        postings = index.lengths[codes].sum(1).cpu().numpy() if codes.shape[0] else np.zeros(0, np.int64)
        regime = self.regime
        if regime == "auto":
            mean = float(postings.mean()) if postings.size else 0.0
            regime = choose_regime(index.n_items, codes.shape[1], mean, int(index.lengths.max()), self.tile_items)
        if regime == "candidate":
            # flat keys, then the ragged selection's gather index and padded matrix
            # (at most twice the keys, 8 bytes each)
            return Plan(40 * postings + 16 * k, regime=regime)
        blocks = -(-index.n_items // self.tile_items)
        return Plan(np.full(postings.shape, 16 * blocks * min(k, self.tile_items) + 16 * k), regime=regime)

    def search(
        self, index: CodeIndex, codes: torch.Tensor, k: int, exclude: Exclusion, regime: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if exclude is None:
            ex_offsets = torch.zeros(codes.shape[0] + 1, dtype=torch.int64, device=codes.device)
            ex_items = torch.zeros(1, dtype=torch.int64, device=codes.device)
        else:
            ex_offsets, ex_items = exclude
            if ex_items.numel() == 0:  # kernels need a real pointer; nothing is read from it
                ex_items = torch.zeros(1, dtype=torch.int64, device=codes.device)
        args = (index.indptr, index.items, index.scores, codes, ex_offsets, ex_items, k)
        if regime == "candidate":
            return candidate_search(*args)
        return tiled_search(*args, index.n_items, block_n=self.tile_items)
