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


@dataclass(frozen=True)
class ItemCodesRegime:
    """R4, item codes: V = N codes (each a history item) of ``cap`` postings, queries are
    users' histories (ragged bags, heavy-tailed lengths) with the history excluded."""

    name: str
    n_items: int
    cap: int
    mean_history: float
    longest_history: int
    batch: int
    k: int
    negative_share: float = 0.3  # the default keep rule (by magnitude) keeps negative scores too
    history_sigma: float = 1.0  # lognormal spread of history lengths (Gowalla: mean 27, p50 16, p99 182)

    def scaled(self, by: float) -> ItemCodesRegime:
        """N and B divided by ``by`` (the cap, a share of N, with them); histories keep their shape."""
        if by == 1:
            return self
        n_items = max(2, int(self.n_items / by))
        return replace(self, n_items=n_items, cap=max(1, int(self.cap / by)), batch=max(1, int(self.batch / by)),
                       longest_history=min(self.longest_history, n_items))

    def as_dict(self) -> dict:
        return asdict(self)


ITEM_CODES = {
    "cpu": ItemCodesRegime("R4", 41_000, 410, 27, 800, 8_192, 20),
    "cuda": ItemCodesRegime("R4", 1_000_000, 500, 30, 5_000, 4_096, 100),
}
ITEM_SKEW = 0.8  # Zipf exponent of item popularity: histories and posting lists favour popular items


def popular_rows(lengths: torch.Tensor, n_items: int, gen: torch.Generator, *, block: int = 1 << 16) -> tuple[
        torch.Tensor, torch.Tensor]:
    """CSR (offsets, items) of rows of distinct items drawn by Zipf popularity, row r with
    at most ``lengths[r]`` items (fewer only if the draws repeat too much), sorted by item
    within each row; built ``block`` rows at a time on the generator's device."""
    device = gen.device
    order = torch.randperm(n_items, generator=gen, device=device)  # which items are popular
    parts, counts = [], []
    for lo in range(0, lengths.numel(), block):
        want = lengths[lo : lo + block].to(device)
        rows = torch.repeat_interleave(torch.arange(want.numel(), device=device), 2 * want)
        u = torch.rand(rows.numel(), generator=gen, dtype=torch.float64, device=device)
        ranks = (u.pow(1.0 + 1.0 / ITEM_SKEW) * n_items).to(torch.int64).clamp(max=n_items - 1)
        pairs = torch.unique(rows * n_items + order[ranks])  # distinct (row, item)
        prio = torch.rand(pairs.numel(), generator=gen, device=device)
        row_of = pairs // n_items
        by_prio = torch.argsort(row_of.to(torch.float64) * 2 + prio.to(torch.float64))  # random order within a row
        starts = torch.zeros(want.numel() + 1, dtype=torch.int64, device=device)
        starts[1:] = torch.bincount(row_of, minlength=want.numel()).cumsum(0)
        rank = torch.arange(pairs.numel(), device=device) - starts[row_of[by_prio]]
        kept = torch.sort(pairs[by_prio][rank < want[row_of[by_prio]]]).values
        parts.append(kept % n_items)
        counts.append(torch.bincount(kept // n_items, minlength=want.numel()))
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cat(counts).cumsum(0)
    return offsets, torch.cat(parts)


def build_item_codes(regime: ItemCodesRegime, device: str, *, seed: int = 0, n_batches: int = 3) -> tuple[
        CodeIndex, list[tuple[torch.Tensor, torch.Tensor]]]:
    """R4's index (float32 scores, lognormal magnitudes, ``negative_share`` negated) and
    ``n_batches`` batches of (history codes, offsets); each batch holds one history of
    the longest length."""
    gen = torch.Generator(device=device).manual_seed(seed)
    indptr, items = popular_rows(torch.full((regime.n_items,), regime.cap, dtype=torch.int64), regime.n_items, gen)
    scores = torch.randn(items.numel(), generator=gen, device=device).exp() * 0.01
    negative = torch.rand(items.numel(), generator=gen, device=device) < regime.negative_share
    index = CodeIndex.from_postings(indptr, items.to(torch.int32), torch.where(negative, -scores, scores), regime.n_items)
    mu = float(torch.log(torch.tensor(regime.mean_history))) - regime.history_sigma**2 / 2
    batches = []
    for _ in range(n_batches):
        raw = torch.randn(regime.batch, generator=gen, device=device) * regime.history_sigma + mu
        lengths = raw.exp().round().clamp(1, regime.longest_history).to(torch.int64)
        lengths[0] = regime.longest_history
        offsets, codes = popular_rows(lengths, regime.n_items, gen)
        batches.append((codes, offsets))
    return index, batches
