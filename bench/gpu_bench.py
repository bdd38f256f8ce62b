"""The GPU half of ``bench/gpu_check.sh``: the ``sparcode bench`` harness on regimes R1-R3
at full size on CUDA, plus the GPU targets checked in the same run.

    python -m sparcode.bench.gpu_bench --out DIR [--regimes R1 R2 R3]
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

from .harness import bench_regime, device_label, optional_versions, table
from .regimes import REGIMES


def targets(results: dict) -> dict:
    """The GPU targets, on the Triton backend's automatic choice: R1 >= 4x two-tower q/s;
    R2 >= 2x two-tower and >= 25% of the copy bandwidth on posting bytes; R3 (k = 1,000)
    under 40 GB of peak memory and >= 10x two-tower."""
    out = {}
    by = {r: {m["method"]: m for m in res["methods"]} for r, res in results.items()}

    def ratio(regime: str) -> float | None:
        methods = by.get(regime, {})
        if "sparcode-triton" in methods and "two-tower-bruteforce" in methods:
            return methods["sparcode-triton"]["qps_median"] / methods["two-tower-bruteforce"]["qps_median"]
        return None

    for regime, goal in (("R1", 4.0), ("R2", 2.0), ("R3", 10.0)):
        value = ratio(regime)
        if value is not None:
            out[f"{regime}_triton_over_two_tower"] = {"value": value, "target": goal, "met": value >= goal}
    if "bandwidth_fraction_of_copy" in by.get("R2", {}).get("sparcode-triton", {}):
        frac = by["R2"]["sparcode-triton"]["bandwidth_fraction_of_copy"]
        out["R2_bandwidth_fraction"] = {"value": frac, "target": 0.25, "met": frac >= 0.25}
    if "sparcode-triton" in by.get("R3", {}):
        peak = by["R3"]["sparcode-triton"]["peak_memory_bytes"]
        out["R3_k1000_peak_memory_bytes"] = {"value": peak, "target": 40e9, "met": peak < 40e9}
    return out


def write_report(out: Path, results: dict, device: str, cuda: bool) -> dict:
    """Write ``gpu-bench.json`` atomically (temp file + rename) and return the report."""
    report = {"benchmark": "gpu_bench", "date": date.today().isoformat(), "dry_run": not cuda,
              "device": device_label(device), "torch": torch.__version__, "triton": optional_versions().get("triton"),
              "python": platform.python_version(), "regimes": results, "targets": targets(results) if cuda else {}}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu-bench.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / "gpu-bench.json")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU benchmark of regimes R1-R3")
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu-bench.json")
    parser.add_argument("--regimes", nargs="+", default=["R1", "R3", "R2"], choices=list(REGIMES))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_bench: no CUDA device found; rerun with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    results = {}
    for name in args.regimes:
        regime = REGIMES[name]
        if not cuda:  # a few hundred items and queries: exercises every code path in seconds
            regime = replace(regime.scaled(2000, 512), n_codes=64, mean_postings=20, k=min(regime.k, 20))
        print(f"[gpu_bench] {name}: {regime}", flush=True)
        results[name] = bench_regime(regime, device, repeats=5 if cuda else 2, all_to_all_queries=1, triton_side_by_side=True)
        report = write_report(args.out, results, device, cuda)  # after every regime: a timeout keeps what ran
    print(table(list(results.values()), report["device"] + (" (full sizes)" if cuda else " (dry run, tiny sizes)")))
    for key, t in report["targets"].items():
        print(f"target {key}: {t['value']:.4g} (target {t['target']:.4g}) {'MET' if t['met'] else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
