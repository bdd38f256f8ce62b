"""Bags of codes: a batch as flat codes + offsets + optional per-code weights.

Every search path works on ``Bags``, so a batch costs the codes it holds, never
B x (longest bag). The spelling is the one recommendation code already uses for bags:
``torch.nn.EmbeddingBag(input, offsets, per_sample_weights)`` with the last offset
included, TorchRec's ``KeyedJaggedTensor`` (values, offsets, weights), or a
``torch.nested`` jagged tensor; a dense (B, T) batch is the bag form with T codes each.
Offsets are spelled the same way for ``exclude``: B + 1 entries from 0 to the number of
codes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .arrays import Kind, to_torch


class Bags(NamedTuple):
    """Query q's codes are ``codes[offsets[q]:offsets[q+1]]`` (int64), each with the weight
    ``weights[j]`` (float32; 1 for every code when None). score(q, i) = the sum over the
    bag of weight x item i's stored score."""

    codes: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None = None

    @property
    def n_queries(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) int64 codes per query."""
        return self.offsets.diff()

    def query_of(self) -> torch.Tensor:
        """(nnz,) int64: the query each code belongs to."""
        return torch.repeat_interleave(torch.arange(self.n_queries, device=self.codes.device), self.lengths,
                                       output_size=self.codes.numel())

    def segment_sum(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) sums of a per-code int64 quantity over each bag: O(codes), not O(B x T_max)."""
        total = torch.zeros(self.codes.numel() + 1, dtype=torch.int64, device=self.codes.device)
        total[1:] = values.to(torch.int64).cumsum(0)
        return total[self.offsets[1:]] - total[self.offsets[:-1]]

    def postings(self, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) int64 postings each query gathers, given the index's list ``lengths``."""
        return self.segment_sum(lengths[self.codes])

    def slice(self, start: int, stop: int) -> Bags:
        """Queries [start, stop) with offsets from 0."""
        part = self.offsets[start : stop + 1]
        lo, hi = int(part[0]), int(part[-1])
        weights = None if self.weights is None else self.weights[lo:hi]
        return Bags(self.codes[lo:hi], part - lo, weights)

    def take(self, rows: torch.Tensor) -> Bags:
        """The bags of queries ``rows`` (int64), in that order."""
        offsets, (codes, weights) = take_rows(self.offsets, [self.codes, self.weights], rows)
        return Bags(codes, offsets, weights)

    def nonnegative_weights(self) -> torch.Tensor:
        """(B,) bool: whether every weight of the query is >= 0 (True without weights)."""
        if self.weights is None:
            return torch.ones(self.n_queries, dtype=torch.bool, device=self.codes.device)
        return self.segment_sum(self.weights < 0) == 0

    @classmethod
    def dense(cls, codes: torch.Tensor, weights: torch.Tensor | None = None) -> Bags:
        """Bags of a (B, T) code matrix (and (B, T) weights)."""
        n_queries, n_tokens = codes.shape
        offsets = torch.arange(n_queries + 1, dtype=torch.int64, device=codes.device) * n_tokens
        return cls(codes.reshape(-1), offsets, None if weights is None else weights.reshape(-1))


def take_rows(offsets: torch.Tensor, columns: list[torch.Tensor | None],
              rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Rows ``rows`` of a CSR (``offsets`` and per-value ``columns``; None stays None):
    (new offsets, new columns), costing the values those rows hold."""
    lengths = offsets.diff()[rows]
    new = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=offsets.device)
    new[1:] = lengths.cumsum(0)
    total = int(new[-1])
    at = torch.repeat_interleave(offsets[rows] - new[:-1], lengths, output_size=total) + torch.arange(
        total, device=offsets.device)
    return new, [None if c is None else c[at] for c in columns]


def to_bags(batch: Any, offsets: Any, weights: Any, n_codes: int, device: torch.device) -> tuple[Bags, Kind]:
    """Validate integer codes given as (B, T), as flat codes with ``offsets`` (B + 1,
    from 0 to the number of codes), or as a ``torch.nested`` jagged tensor; ``weights``
    has the codes' shape. Errors name the argument."""
    if isinstance(batch, torch.Tensor) and batch.is_nested:
        if offsets is not None:
            raise ValueError("offsets: a nested batch carries its own offsets; pass offsets=None")
        if weights is not None and isinstance(weights, torch.Tensor) and weights.is_nested:
            weights = weights.values()
        batch, offsets = batch.values(), batch.offsets()
        if batch.dim() != 1:
            raise ValueError(f"batch: a nested batch must hold 1-d bags of codes, got values of shape {tuple(batch.shape)}")
    codes, kind = to_torch(batch, "batch")
    codes = _on(codes, kind, device, "batch")
    _check_integer(codes, "batch", "codes")
    if offsets is None:
        if codes.dim() != 2:
            raise ValueError(f"batch: expected (B, T) codes, or flat codes with offsets; got shape {tuple(codes.shape)}")
        if codes.shape[1] < 1:
            raise ValueError("batch: needs at least one code per query")
        shape = tuple(codes.shape)
        bags = Bags.dense(codes.to(torch.int64))
    else:
        if codes.dim() != 1:
            raise ValueError(f"batch: with offsets, expected 1-d flat codes, got shape {tuple(codes.shape)}")
        shape = tuple(codes.shape)
        bags = Bags(codes.to(torch.int64), check_offsets(offsets, codes.numel(), "offsets", device, kind))
    if bags.codes.numel():
        low, high = int(bags.codes.min()), int(bags.codes.max())
        if low < 0 or high >= n_codes:
            raise ValueError(f"batch: code {low if low < 0 else high} is outside [0, {n_codes})")
    if weights is not None:
        w, w_kind = to_torch(weights, "weights")
        w = _on(w, w_kind, device, "weights")
        if tuple(w.shape) != shape:
            raise ValueError(f"weights: expected one weight per code, shape {shape}, got {tuple(w.shape)}")
        if not (w.dtype.is_floating_point or w.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
            raise TypeError(f"weights: expected real numbers, got {w.dtype}")
        w = w.to(torch.float32).reshape(-1)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("weights: contain NaN or infinite values (or values beyond float32)")
        bags = bags._replace(weights=w)
    return bags, kind


def check_offsets(offsets: Any, n_values: int, name: str, device: torch.device, kind: Kind | None = None) -> torch.Tensor:
    """(B + 1,) int64 offsets running from 0 to ``n_values``, non-decreasing."""
    if isinstance(offsets, (list, range)):
        offsets = torch.tensor(list(offsets), dtype=torch.int64)
    t, t_kind = to_torch(offsets, name)
    t = _on(t, t_kind, device, name)
    _check_integer(t, name, "offsets")
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"{name}: expected a 1-d array of B + 1 offsets, got shape {tuple(t.shape)}")
    t = t.to(torch.int64)
    if int(t[0]) != 0:
        raise ValueError(f"{name}: must start at 0, got {int(t[0])}")
    if int(t[-1]) != n_values:
        raise ValueError(f"{name}: must end at the number of values ({n_values}), got {int(t[-1])}")
    if bool((t.diff() < 0).any()):
        raise ValueError(f"{name}: must be non-decreasing")
    return t


def _on(t: torch.Tensor, kind: Kind, device: torch.device, name: str) -> torch.Tensor:
    if kind == "numpy" or (t.device.type == "cpu" and device.type == "cpu"):
        return t.to(device)
    if t.device != device:
        raise ValueError(f"{name}: is on {t.device} but the index is on {device}; move one of them")
    return t


def _check_integer(t: torch.Tensor, name: str, what: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer {what}, got {t.dtype}")
