"""The GPU half of ``bench/gpu_check.sh``: the ``sparcode bench`` harness on regimes R1-R4
at full size on CUDA, each Triton regime forced side by side (v3's table beside v2's
candidate, tiled and dense) with a kernel / selection / rest breakdown, the copy
bandwidth and an atomic compare-and-swap probe (L2- vs HBM-resident), plus the GPU
targets checked in the same run.

    python -m sparcode.bench.gpu_bench --out DIR [--regimes R1 R2 R3 R4]
    python -m sparcode.bench.gpu_bench --dry-run --out DIR   # tiny sizes on CPU, no GPU needed

Writes ``gpu-bench.json`` (device, versions, copy bandwidth and every method's figures per
regime, the targets) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from sparcode.engine.atomic import atomic_write_text

from .atomics_probe import probe
from .harness import bench_item_codes, bench_regime, device_label, optional_versions, table
from .regimes import ITEM_CODES, REGIMES

TARGETS = {"R1": 10.0, "R2": 2.0, "R3": 10.0, "R4": 10.0}  # Triton (automatic choice) over two-tower brute force


def targets(results: dict) -> dict:
    """The GPU targets, on the Triton backend's automatic choice: R1, R3 and R4 (item codes
    at 1M items) >= 10x two-tower brute force, R2 >= 2x; R3 (k = 1,000) under 40 GB."""
    out = {}
    by = {r: {m["method"]: m for m in res["methods"]} for r, res in results.items() if "methods" in res}
    for regime, goal in TARGETS.items():
        methods = by.get(regime, {})
        if "sparcode-triton" in methods and "two-tower-bruteforce" in methods:
            value = methods["sparcode-triton"]["qps_median"] / methods["two-tower-bruteforce"]["qps_median"]
            out[f"{regime}_triton_over_two_tower"] = {"value": value, "target": goal, "met": value >= goal}
    if "sparcode-triton" in by.get("R3", {}):
        peak = by["R3"]["sparcode-triton"]["peak_memory_bytes"]
        out["R3_k1000_peak_memory_bytes"] = {"value": peak, "target": 40e9, "met": peak < 40e9}
    return out


def write_report(out: Path, results: dict, device: str, cuda: bool) -> dict:
    """Write ``gpu-bench.json`` atomically and return the report."""
    report = {"benchmark": "gpu_bench", "date": date.today().isoformat(), "dry_run": not cuda,
              "device": device_label(device), "torch": torch.__version__, "triton": optional_versions().get("triton"),
              "python": platform.python_version(), "regimes": results, "targets": targets(results) if cuda else {}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gpu-bench.json", json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU benchmark of regimes R1-R4")
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu-bench.json")
    parser.add_argument("--regimes", nargs="+", default=["R4", "R1", "R3", "R2"], choices=[*REGIMES, "R4"])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_bench: no CUDA device found; rerun with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    results: dict = {"atomics": probe(device, dry_run=not cuda)}
    report = write_report(args.out, results, device, cuda)
    for name in args.regimes:
        if name == "R4":
            regime = ITEM_CODES["cuda"]
            if not cuda:
                regime = replace(regime, n_items=300, cap=8, mean_history=5, longest_history=20, batch=8, k=10)
            print(f"[gpu_bench] {name}: {regime}", flush=True)
            results[name] = bench_item_codes(regime, device, repeats=5 if cuda else 2, triton_side_by_side=True)
        else:
            regime = REGIMES[name]
            if not cuda:  # a few hundred items and queries: exercises every code path in seconds
                regime = replace(regime.scaled(2000, 512), n_codes=64, mean_postings=20, k=min(regime.k, 20))
            print(f"[gpu_bench] {name}: {regime}", flush=True)
            results[name] = bench_regime(regime, device, repeats=5 if cuda else 2, all_to_all_queries=1,
                                         triton_side_by_side=True)
        report = write_report(args.out, results, device, cuda)  # after every regime: a timeout keeps what ran
    print(table([r for r in results.values() if "methods" in r],
                report["device"] + (" (full sizes)" if cuda else " (dry run, tiny sizes)")))
    print(f"atomic_cas: {results['atomics']}")
    for key, t in report["targets"].items():
        print(f"target {key}: {t['value']:.4g} (target {t['target']:.4g}) {'MET' if t['met'] else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
