"""GPU benchmark of the search regimes R1-R3: Triton backend, torch reference backend and
two-tower brute force, with the card's copy bandwidth measured in the same run.

    python -m sparcode.bench.gpu_bench --out DIR [--regimes R1 R2 R3]
    python -m sparcode.bench.gpu_bench --dry-run --out DIR   # tiny sizes, CPU, no GPU needed

Writes ``gpu-bench.json`` (device, versions, per regime and method: queries/s median of
repeats with min/max, postings/s, achieved / copy bandwidth, peak memory, and the
acceptance targets checked) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from sparcode.engine import Engine

from .regimes import REGIMES, Regime, build
from .timing import cpu_name

TWO_TOWER_DIM = 64


class Clock:
    """Median-of-repeats timing that synchronizes the device around each run."""

    def __init__(self, device: str, *, min_repeats: int, max_seconds: float) -> None:
        self.cuda = device.startswith("cuda")
        self.min_repeats = min_repeats
        self.max_seconds = max_seconds

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, run: Callable[[int], object]) -> dict[str, float]:
        """``run(i)`` gets the repeat number, to rotate fresh inputs."""
        run(0)  # warm-up: compilation, autotuning, derived layouts
        self.sync()
        times: list[float] = []
        spent = 0.0
        i = 1
        while len(times) < self.min_repeats or (spent < self.max_seconds and len(times) < 50):
            start = time.perf_counter()
            run(i)
            self.sync()
            times.append(time.perf_counter() - start)
            spent += times[-1]
            i += 1
            if spent > 4 * self.max_seconds:
                break
        return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def copy_bandwidth(device: str, clock: Clock, n_bytes: int) -> float:
    """Device-to-device copy rate, bytes read plus bytes written per second."""
    src = torch.rand(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = clock.measure(lambda i: dst.copy_(src))
    return 2 * src.numel() * 4 / t["median_s"]


def two_tower(n_items: int, device: str, chunk: int) -> Callable[[torch.Tensor, int], object]:
    """Brute-force MIPS: item matrix (N, 64), bfloat16 on GPU (float32 on CPU), + topk."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    items = torch.randn(n_items, TWO_TOWER_DIM, device=device).to(dtype)

    def search(queries: torch.Tensor, k: int) -> object:
        out = []
        for part in queries.split(chunk):
            out.append(torch.topk(part @ items.T, min(k, n_items), dim=1))
        return out

    return search


def peak_memory(device: str, run: Callable[[], object]) -> int | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def bench_regime(regime: Regime, device: str, clock: Clock, copy_bw: float | None, *, torch_batch: int) -> dict:
    index, batches = build(regime, device)
    postings = [int(index.lengths[b].sum()) for b in batches]
    posting_bytes = 4 + index.scores.element_size()
    report: dict = {"config": regime.as_dict(), "index": {k: v for k, v in index.stats().items() if k != "device"},
                    "mean_postings_per_query": statistics.mean(postings) / regime.batch, "methods": {}}
    methods: dict[str, tuple[Callable[[int], object], int]] = {}
    backends = ["triton", "torch"] if device.startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]
    for backend in backends:
        engine = Engine(index, backend=backend, workspace_bytes=8 * 2**30 if device.startswith("cuda") else None)
        # the torch reference is slow on big batches: time a slice and report per query
        rows = regime.batch if backend == "triton" else min(regime.batch, torch_batch)
        methods[f"sparcode-{backend}"] = (
            lambda i, e=engine, r=rows: e.search(batches[i % len(batches)][:r], k=regime.k), rows)
    tower = two_tower(regime.n_items, device, chunk=max(1, min(regime.batch, 2**31 // max(1, regime.n_items) // 2)))
    queries = [torch.randn(regime.batch, TWO_TOWER_DIM, device=device).to(
        torch.bfloat16 if device.startswith("cuda") else torch.float32) for _ in batches]
    methods["two-tower-bruteforce"] = (lambda i: tower(queries[i % len(queries)], regime.k), regime.batch)

    for name, (run, rows) in methods.items():
        try:
            t = clock.measure(run)
            entry = {
                "qps_median": rows / t["median_s"], "qps_min": rows / t["max_s"], "qps_max": rows / t["min_s"],
                "repeats": t["repeats"], "batch_timed": rows,
                "peak_memory_bytes": peak_memory(device, lambda: run(0)),
            }
            if name.startswith("sparcode"):
                per_query = statistics.mean(postings) / regime.batch
                entry["postings_per_s"] = per_query * entry["qps_median"]
                entry["posting_bytes_per_s"] = entry["postings_per_s"] * posting_bytes
                if copy_bw:
                    entry["bandwidth_fraction_of_copy"] = entry["posting_bytes_per_s"] / copy_bw
            report["methods"][name] = entry
        except torch.OutOfMemoryError as exc:
            report["methods"][name] = {"error": f"out of memory: {exc}"[:300]}
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    del index, batches
    return report


def targets(results: dict) -> dict:
    """The kernels issue's acceptance targets, checked on this run's numbers."""
    out = {}
    r1, r2, r3 = (results.get(r, {}).get("methods", {}) for r in ("R1", "R2", "R3"))
    if "sparcode-triton" in r1 and "two-tower-bruteforce" in r1:
        ratio = r1["sparcode-triton"].get("qps_median", 0) / r1["two-tower-bruteforce"].get("qps_median", float("inf"))
        out["R1_triton_over_two_tower"] = {"value": ratio, "target": 4.0, "met": ratio >= 4.0}
    if "sparcode-triton" in r2 and "bandwidth_fraction_of_copy" in r2["sparcode-triton"]:
        frac = r2["sparcode-triton"]["bandwidth_fraction_of_copy"]
        out["R2_bandwidth_fraction"] = {"value": frac, "target": 0.5, "met": frac >= 0.5}
    if "sparcode-triton" in r3:
        peak = r3["sparcode-triton"].get("peak_memory_bytes")
        ok = "error" not in r3["sparcode-triton"] and peak is not None and peak < 40e9
        out["R3_k1000_peak_memory"] = {"value": peak, "target": 40e9, "met": ok}
    return out


def table(report: dict) -> str:
    lines = [report["device"] + (" (tiny sizes)" if report["dry_run"] else " (full sizes)"),
             f"copy bandwidth: {report['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s" if report["copy_bandwidth_bytes_per_s"] else "",
             f"{'regime':<7}{'method':<24}{'queries/s':>14}{'postings/s':>14}{'bw/copy':>9}{'peak GB':>9}"]
    for regime, res in report["regimes"].items():
        for name, m in res["methods"].items():
            if "error" in m:
                lines.append(f"{regime:<7}{name:<24}  {m['error'][:60]}")
                continue
            bw = m.get("bandwidth_fraction_of_copy")
            peak = m.get("peak_memory_bytes")
            lines.append(f"{regime:<7}{name:<24}{m['qps_median']:>14,.0f}{m.get('postings_per_s', 0):>14.3g}"
                         f"{(f'{bw:.0%}' if bw is not None else '-'):>9}{(f'{peak / 1e9:.1f}' if peak else '-'):>9}")
    for name, t in report["targets"].items():
        lines.append(f"target {name}: {t['value']!s:.8} (target {t['target']}) {'MET' if t['met'] else 'NOT MET'}")
    return "\n".join(line for line in lines if line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU benchmark of regimes R1-R3")
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu-bench.json")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="time budget per method and regime")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_bench: no CUDA device found; rerun with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    clock = Clock(device, min_repeats=5 if cuda else 2, max_seconds=args.max_seconds if cuda else 0.0)
    copy_bw = copy_bandwidth(device, clock, 2**30) if cuda else None
    report = {
        "benchmark": "gpu_bench", "date": date.today().isoformat(), "dry_run": not cuda,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({cpu_name()}), dry run",
        "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
        "copy_bandwidth_bytes_per_s": copy_bw, "regimes": {},
    }
    for name in args.regimes:
        regime = REGIMES[name] if cuda else REGIMES[name].scaled(items_by=2000, batch_by=512)
        if not cuda:
            regime = Regime(regime.name, 64, regime.n_tokens, regime.n_items, min(regime.mean_postings, 20), regime.batch, min(regime.k, 20))
        print(f"[gpu_bench] {name}: {regime}", flush=True)
        report["regimes"][name] = bench_regime(regime, device, clock, copy_bw, torch_batch=256 if cuda else regime.batch)
    report["targets"] = targets(report["regimes"]) if cuda else {}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
