"""How fast ``tl.atomic_cas`` runs on tables that stay in L2 and on tables that do not:
the table regime's inserts are compare-and-swaps into per-query tables sized to stay in
L2 (``engine/triton_backend.py::L2_TABLE_BYTES``), and this probe measures what that
buys on the card at hand."""

from __future__ import annotations

import statistics
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _cas_kernel(table_ptr, n_slots, rounds, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for r in range(rounds):
        key = (pid.to(tl.int64) * BLOCK + lanes + r * 7919) * 2654435769
        slot = (key >> 7) % n_slots
        tl.atomic_cas(table_ptr + slot, tl.full([BLOCK], -1, dtype=tl.int32), (key & 0x7FFFFFFF).to(tl.int32))


def cas_rate(table_bytes: int, device: str, *, programs: int = 1024, rounds: int = 64, block: int = 256,
             repeats: int = 5) -> float:
    """Compare-and-swaps per second at scattered slots of a table of ``table_bytes``."""
    n_slots = max(1, table_bytes // 4)
    table = torch.full((n_slots,), -1, dtype=torch.int32, device=device)
    times = []
    for _ in range(repeats + 1):
        table.fill_(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _cas_kernel[(programs,)](table, n_slots, rounds, BLOCK=block)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return programs * rounds * block / statistics.median(times[1:])


def probe(device: str, *, dry_run: bool = False) -> dict:
    """CAS/s on an L2-resident table (16 MB) and an HBM-resident one (2 GB)."""
    if dry_run:
        small = cas_rate(4096, device, programs=2, rounds=2, block=16, repeats=1)
        return {"l2_resident_cas_per_s": small, "hbm_resident_cas_per_s": small, "dry_run": True}
    l2 = cas_rate(16 * 2**20, device)
    hbm = cas_rate(2 * 2**30, device)
    return {"l2_resident_cas_per_s": l2, "hbm_resident_cas_per_s": hbm, "l2_over_hbm": l2 / hbm,
            "l2_table_bytes": 16 * 2**20, "hbm_table_bytes": 2 * 2**30}
