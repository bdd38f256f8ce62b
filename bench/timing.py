"""Timing and memory helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def median_seconds(run: Callable[[], object], *, repeats: int = 7, warmup: int = 2,
                   sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median, min and max wall time of ``run`` after warm-up."""
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last reset (VmHWM)."""
    return _status_bytes("VmHWM:")


def current_rss_bytes() -> int:
    return _status_bytes("VmRSS:")


def reset_peak_rss() -> None:
    """Start a new peak measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def cpu_name() -> str:
    """CPU model and the cores this process may use, e.g. 'AMD EPYC, 2 cores'."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {len(os.sched_getaffinity(0))} cores"
