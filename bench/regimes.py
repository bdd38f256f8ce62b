"""The benchmark regimes of DESIGN.md (Benchmarks) and their synthetic data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from sparcode.engine import CodeIndex
from sparcode.engine.synthetic import random_codes, random_index

SKEW = 0.5  # Zipf exponent for code popularity, posting lengths and item popularity


@dataclass(frozen=True)
class Regime:
    name: str
    n_codes: int
    n_tokens: int
    n_items: int
    mean_postings: int
    batch: int
    k: int

    def scaled(self, items_by: float, batch_by: float) -> Regime:
        """Smaller N and B (CPU runs use 10 and 4). Mean L shrinks with N so that the
        density, which is what defines a regime, stays the same (R1 on CPU: L = 100)."""
        n_items = max(1, int(self.n_items / items_by))
        return replace(self, n_items=n_items, batch=max(1, int(self.batch / batch_by)),
                       mean_postings=max(1, min(n_items, round(self.mean_postings / items_by))))

    def as_dict(self) -> dict:
        return asdict(self)


REGIMES = {
    "R1": Regime("R1", 65_536, 4, 1_000_000, 1_000, 4_096, 100),
    "R2": Regime("R2", 4_096, 8, 1_000_000, 50_000, 4_096, 100),
    "R3": Regime("R3", 65_536, 4, 10_000_000, 5_000, 4_096, 1_000),
}


def build(regime: Regime, device: str, *, seed: int = 0, n_batches: int = 3) -> tuple[CodeIndex, list[torch.Tensor]]:
    """The regime's index (float16 scores) and ``n_batches`` distinct query batches."""
    index = random_index(regime.n_codes, regime.n_items, regime.mean_postings, skew=SKEW, seed=seed, device=device)
    batches = [random_codes(regime.batch, regime.n_tokens, regime.n_codes, skew=SKEW, seed=seed + 1 + i, device=device)
               for i in range(n_batches)]
    return index, batches
