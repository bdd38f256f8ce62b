"""Triton helpers shared by the search kernels: key packing and binary search.

The packing matches ``keys.pack_keys`` bit for bit, so kernel output can be compared
with the torch references with ``torch.equal``.
"""

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import keys

# Triton kernels read module globals only as constexpr
_SCORE_SHIFT = tl.constexpr(keys.SCORE_SHIFT)
_ITEM_BIAS = tl.constexpr(keys.ITEM_BIAS)
_MAGNITUDE_MASK = tl.constexpr(keys.MAGNITUDE_MASK)


@triton.jit
def empty_keys(like):
    """int64 min (``keys.EMPTY_KEY``) shaped like ``like``: only the sign bit set."""
    return (tl.zeros_like(like).to(tl.int64) + 1) << 63


@triton.jit
def pack_keys(scores, items):
    """float32 scores, int ids -> int64 keys: higher score first, then lower id."""
    bits = (scores + 0.0).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & _MAGNITUDE_MASK)
    return (ordered.to(tl.int64) << _SCORE_SHIFT) | (_ITEM_BIAS - items.to(tl.int64))


@triton.jit
def lower_bound(items_ptr, lo, hi, target, STEPS: tl.constexpr):
    """First position in [lo, hi) of a sorted int array whose value is >= target, for
    vectors (or scalars) of ranges; STEPS >= ceil(log2(longest range + 1))."""
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        value = tl.load(items_ptr + mid, mask=active, other=0)
        right = active & (value < target)
        left = active & (value >= target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(left, mid, hi)
    return lo


def search_steps(longest: int) -> int:
    """Binary-search iterations that settle any range of ``longest`` elements."""
    return max(1, int(longest).bit_length())


def new_counter(device: torch.device) -> torch.Tensor:
    """A zeroed survivor counter: int64, so that positions past 2**31 never wrap negative
    (and pass ``at < capacity``)."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def new_counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed per-query survivor counters, int64 like ``new_counter``'s."""
    return torch.zeros(n, dtype=torch.int64, device=device)


def packed_launch(launch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None], capacity: int,
                  device: torch.device, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a kernel that packs (owner, key) survivors behind an int64 atomic counter:
    ``launch(keys, owners, counter, capacity)`` (the kernel counts and places in int64
    too, so positions never wrap). A launch that finds more than ``capacity`` still
    counts them all, so a second launch with that capacity fits exactly, unless that is
    over ``limit`` (which also caps the first capacity): then it raises
    ``SurvivorOverflow`` instead of allocating.
    Returns (owners, keys) grouped by owner, best first (``keys.group_survivors``)."""
    from .keys import SurvivorOverflow, group_survivors

    counter = new_counter(device)
    capacity = capacity if limit is None else min(capacity, limit)
    while True:
        keys = torch.empty(max(1, capacity), dtype=torch.int64, device=device)
        owners = torch.empty(max(1, capacity), dtype=torch.int64, device=device)
        counter.zero_()
        launch(keys, owners, counter, capacity)
        found = int(counter)
        if found <= capacity:
            return group_survivors(owners[:found], keys[:found])
        if limit is not None and found > limit:
            raise SurvivorOverflow(found, limit)
        capacity = found
