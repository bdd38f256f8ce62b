"""Large CPU tensors on transparent huge pages (Linux).

torch takes each CPU tensor of a few MB or more fresh from the kernel (glibc maps big
allocations and unmaps them when freed), so every 4 KiB page of it costs a page fault
and a zero fill when first touched. SparCode's training step makes and drops tensors
of 1,024 queries x 4 tokens x 100 negatives x 64 hidden units (Gowalla on a CPU,
float32, 105 MB each; ~10 of them by the shapes, so ~250,000 faults a step, counted
from the sizes, not measured). With ``THP_MEM_ALLOC_ENABLE=1`` torch page-aligns
allocations of 2 MiB and more and advises the kernel to back them with 2 MiB pages,
one fault each: a Gowalla epoch on 2 cores took 317 s instead of 473 s (docs/performance.md).
"""

from __future__ import annotations

import os
import sys

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def request_huge_pages() -> bool:
    """Ask torch for huge pages unless ``THP_MEM_ALLOC_ENABLE`` is set already (``=0``
    keeps them off). torch reads the variable once, at its first CPU allocation, so this
    must run before any CPU tensor exists: importing ``sparcode.engine`` calls it first.
    Returns whether the variable asks for them (always False off Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault(VARIABLE, "1")
    return os.environ[VARIABLE] == "1"
