"""Dense score rows: the index as a (V, N) matrix, NaN where a code's list lacks the item.

For indexes whose queries touch a large share of the items (R2-like), summing a query's
T rows over contiguous items costs T x N sequential reads, where the posting path costs
one random access per posting: the dense path wins once the postings per query approach
N / (the random-to-sequential cost ratio). NaN marks absent pairs, so the candidates
stay exactly "items in some list" also for zero and negative scores, and summing in
token order (the first present score, then each next one added) gives the same float32
sums as the posting path, bit for bit.

The rows are built only when they fit a memory budget: ``DENSE_FRACTION`` of the memory
available on the index's device unless the engine is given ``dense_bytes``.
"""

from __future__ import annotations

import os

import torch

from .index import CodeIndex

DENSE_FRACTION = 0.25  # of the device's available memory, when no budget is given
BUILD_BLOCK = 1 << 24  # postings scattered into the rows at a time


def available_bytes(device: torch.device) -> int:
    """Memory the device has free now: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def dense_budget(index: CodeIndex, dense_bytes: int | None) -> int:
    """The bytes the dense rows may take: ``dense_bytes`` if given, else a fraction of what
    the index's device has available."""
    if dense_bytes is not None:
        return dense_bytes
    return int(DENSE_FRACTION * available_bytes(index.device))


def rows_bytes(index: CodeIndex, dtype: torch.dtype) -> int:
    return index.n_codes * index.n_items * torch.empty((), dtype=dtype).element_size()


def fits(index: CodeIndex, dtype: torch.dtype, dense_bytes: int | None) -> bool:
    """Whether the rows in ``dtype`` fit the budget (or are built already); never with a
    budget of 0."""
    if dense_bytes == 0:
        return False
    if any(isinstance(name, tuple) and name[:2] == ("dense_rows", dtype) for name in index.derived_names()):
        return True
    return rows_bytes(index, dtype) <= dense_budget(index, dense_bytes)


def dense_rows(index: CodeIndex, dtype: torch.dtype, absent: float = float("nan")) -> torch.Tensor:
    """The (V, N) rows in ``dtype`` with ``absent`` where a list lacks the item (NaN in
    general; 0 serves an index whose scores are all > 0); built once per index."""
    return index.derived(("dense_rows", dtype, str(absent)), lambda ix: build_rows(ix, dtype, absent))


def build_rows(index: CodeIndex, dtype: torch.dtype, absent: float = float("nan")) -> torch.Tensor:
    rows = torch.full((index.n_codes, index.n_items), absent, dtype=dtype, device=index.device)
    flat = rows.view(-1)
    for lo in range(0, index.nnz, BUILD_BLOCK):
        hi = min(index.nnz, lo + BUILD_BLOCK)
        positions = torch.arange(lo, hi, device=index.device)
        codes = torch.searchsorted(index.indptr, positions, right=True) - 1
        flat[codes * index.n_items + index.items[lo:hi].to(torch.int64)] = index.scores[lo:hi].to(dtype)
    return rows
