"""The Triton backend: the search kernels of ``sparcode.kernels`` with a regime choice.

On CUDA it is the default. On CPU it runs only under the Triton interpreter
(``TRITON_INTERPRET=1``), which is what the tests do with tiny shapes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sparcode.kernels.candidate_search import SKIP_SHIFT, SkipTable, candidate_search, skip_table
from sparcode.kernels.dense_search import dense_search
from sparcode.kernels.tiled_search import tiled_search

from .bags import Bags
from .dense import dense_rows, fits
from .index import CodeIndex
from .plan import Plan
from .selection import Exclusion, score_floor

TILE_ITEMS = 1024
REGIMES = ("auto", "candidate", "tiled", "dense")
SECTOR_BYTES = 32  # one L2 sector: what a scattered load costs in traffic
SURVIVOR_BYTES = 32  # a dense-regime survivor: its key and owner, and their grouped copies


def choose_regime(n_items: int, n_tokens: float, mean_postings: float, longest: int, tile_items: int = TILE_ITEMS,
                  dense_fits: bool = False, score_bytes: int = 2) -> str:
    """Pick the cheapest regime from a count of memory operations (sectors) per query.

    candidate: every posting binary-searches its superblock segment of all T lists
    (T x log2 of the longest segment, ``longest``) and, if it reaches the floor, is
    written once as a key. tiled: every posting is a read-modify-write of the scratch
    row, every item slot costs an init, a read-back and its share of the on-chip sort,
    and every (code, item block) two binary searches of the code's whole list. dense
    (only when the rows fit their budget): T coalesced rows of N scores. T is the
    batch's mean bag length (``n_tokens``). The
    constants are counted from the kernels' loops, not yet fitted to GPU measurements
    (docs/performance.md).
    """
    steps = max(1, longest.bit_length())
    costs = {"candidate": mean_postings * (n_tokens * steps + 2),
             "tiled": mean_postings * 3 + n_items * (3 + math.log2(tile_items) / 2)
             + n_tokens * -(-n_items // tile_items) * 2 * steps}
    if dense_fits:
        costs["dense"] = n_tokens * n_items * score_bytes / SECTOR_BYTES
    return min(costs, key=costs.get)


def _skip(index: CodeIndex) -> SkipTable:
    """The index's skip table for candidate searches (derived once, ~16 MB at R1)."""
    return index.derived(("skip_table", SKIP_SHIFT), lambda ix: skip_table(ix.indptr, ix.items, ix.n_items))


class TritonBackend:
    """Gather-and-sum in Triton, then ``torch.topk`` over packed keys."""

    name = "triton"

    def __init__(self, regime: str = "auto", tile_items: int = TILE_ITEMS, dense_bytes: int | None = None,
                 workspace_bytes: int | None = None) -> None:
        """``workspace_bytes`` bounds the dense regime's survivors per launch (None: no bound);
        ``Engine`` passes its own."""
        if regime not in REGIMES:
            raise ValueError(f"regime: expected one of {REGIMES}, got {regime!r}")
        if tile_items < 16 or tile_items & (tile_items - 1):
            raise ValueError(f"tile_items: expected a power of two >= 16, got {tile_items}")
        self.regime = regime
        self.tile_items = tile_items
        self.dense_bytes = dense_bytes
        self.workspace_bytes = workspace_bytes

    def plan(self, index: CodeIndex, bags: Bags, k: int) -> Plan:
        postings = bags.postings(index.lengths).cpu().numpy()
        regime = self.regime
        if regime == "auto":
            mean = float(postings.mean()) if postings.size else 0.0
            tokens = float(bags.codes.numel()) / max(1, bags.n_queries)
            dense_ok = fits(index, index.scores.dtype, self.dense_bytes)
            searched = (1 << _skip(index).steps) - 1  # the longest segment a candidate search covers
            regime = choose_regime(index.n_items, tokens, mean, searched, self.tile_items,
                                   dense_ok, index.scores.element_size())
        if regime == "dense":  # survivors of the floor (keys and owners, sorted twice), the (B, k) keys
            return Plan(np.full(postings.shape, 64 * (64 + k) + 16 * k), regime=regime)
        if regime == "candidate":
            # flat keys, then the ragged selection's gather index and padded matrix
            # (at most twice the keys, 8 bytes each)
            return Plan(40 * postings + 16 * k, regime=regime)
        blocks = -(-index.n_items // self.tile_items)
        return Plan(np.full(postings.shape, 16 * blocks * min(k, self.tile_items) + 16 * k), regime=regime)

    def search(
        self, index: CodeIndex, bags: Bags, k: int, exclude: Exclusion, regime: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = bags.codes.device
        if exclude is None:
            ex_offsets = torch.zeros(bags.n_queries + 1, dtype=torch.int64, device=device)
            ex_items = torch.zeros(1, dtype=torch.int64, device=device)
        else:
            ex_offsets, ex_items = exclude
            if ex_items.numel() == 0:  # kernels need a real pointer; nothing is read from it
                ex_items = torch.zeros(1, dtype=torch.int64, device=device)
        codes = bags.codes if bags.codes.numel() else torch.zeros(1, dtype=torch.int64, device=device)
        weights = bags.weights if bags.weights is None or bags.weights.numel() else None
        if regime == "dense":
            floor = score_floor(index, bags, k + ex_offsets.diff())
            limit = None if self.workspace_bytes is None else max(1, self.workspace_bytes // SURVIVOR_BYTES)
            return dense_search(dense_rows(index, index.scores.dtype), codes, bags.offsets, weights, floor, ex_offsets,
                                ex_items, k, block_n=self.tile_items, max_survivors=limit)
        args = (index.indptr, index.items, index.scores, codes, bags.offsets, weights, ex_offsets, ex_items, k)
        if regime == "candidate":
            return candidate_search(*args, floor=score_floor(index, bags, k + ex_offsets.diff()), skip=_skip(index))
        return tiled_search(*args, index.n_items, block_n=self.tile_items)
