"""Normalize per-query exclusion lists to one CSR of internal item ids on the device."""

from __future__ import annotations

from typing import Any

import torch

from .arrays import to_torch
from .bags import check_offsets


def normalize_exclude(
    exclude: Any,
    n_queries: int,
    n_items: int,
    device: torch.device,
    item_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``exclude`` as CSR ``(offsets, items)`` (offsets spelled as a batch's bags: B + 1,
    from 0 to the number of items) or a list of per-query arrays ->
    ``(offsets (B+1) int64, items int64)`` with internal ids, sorted within each query.

    A tuple is CSR, a list is per-query. Ids are external when the index has
    ``item_ids``; ids that are not in the index are dropped, since they can never be
    returned anyway.
    """
    if exclude is None:
        return None
    if isinstance(exclude, tuple):
        if len(exclude) != 2:
            raise ValueError("exclude: a tuple must be CSR (offsets, items)")
        items = _integer_1d(exclude[1], "exclude items", device)
        offsets = check_offsets(exclude[0], items.numel(), "exclude offsets", device)
        if offsets.numel() != n_queries + 1:
            raise ValueError(f"exclude offsets: must have B + 1 = {n_queries + 1} entries, got {offsets.numel()}")
    elif isinstance(exclude, list):
        if len(exclude) != n_queries:
            raise ValueError(f"exclude: expected one item list per query ({n_queries}), got {len(exclude)}")
        parts = [_integer_1d(e, f"exclude[{i}]", device) for i, e in enumerate(exclude)]
        lengths = torch.tensor([p.numel() for p in parts], dtype=torch.int64, device=device)
        offsets = torch.zeros(n_queries + 1, dtype=torch.int64, device=device)
        offsets[1:] = lengths.cumsum(0)
        items = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)
    else:
        raise TypeError("exclude: expected CSR (offsets, items) or a list of per-query arrays")

    rows = torch.repeat_interleave(torch.arange(n_queries, device=device), offsets.diff())
    if item_ids is not None:
        order = torch.argsort(item_ids)
        sorted_ids = item_ids[order]
        pos = torch.searchsorted(sorted_ids, items).clamp(max=max(sorted_ids.numel() - 1, 0))
        known = sorted_ids[pos] == items
        rows, items = rows[known], order[pos[known]]
    else:
        known = (items >= 0) & (items < n_items)
        rows, items = rows[known], items[known]
    # sort by (row, item), dropping repeats, so kernels can binary-search each query's list
    key = torch.unique(rows * (2**32) + items)
    rows, items = key // (2**32), key % (2**32)
    offsets = torch.zeros(n_queries + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.bincount(rows, minlength=n_queries).cumsum(0)
    return offsets, items


def _integer_1d(x: Any, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(x, (list, range)):
        x = torch.tensor(list(x)) if len(x) else torch.empty(0, dtype=torch.int64)
    t, _ = to_torch(x, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer item ids, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int64)
