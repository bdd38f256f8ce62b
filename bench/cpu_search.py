"""CPU search benchmark (engine core acceptance): regime R1 at CPU scale.

V = 65,536, T = 4, N = 100,000, mean L = 100, B = 1,024, k = 100: the CPU backends
(torch, and numba when installed) vs dense accumulation (a B x N float32 buffer +
``torch.topk``) in the same run, and the peak memory of one ``engine.search`` over
B = 100,000 queries in a fresh process, for each backend.

    python -m sparcode.bench.cpu_search [--out bench/results/cpu-search.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

from sparcode.engine import Engine
from sparcode.engine.atomic import atomic_write_text
from sparcode.engine.synthetic import random_codes, random_index

from .timing import cpu_name, current_rss_bytes, median_seconds, peak_rss_bytes, reset_peak_rss

R1_CPU = {"n_codes": 65536, "n_tokens": 4, "n_items": 100_000, "mean_postings": 100, "batch": 1024, "k": 100, "skew": 0.5}


def dense_search(index, codes: torch.Tensor, k: int):
    """The slow path: accumulate every query into a dense (B, N) buffer, then topk."""
    n_queries, n_tokens = codes.shape
    flat = codes.reshape(-1)
    lengths = index.lengths[flat]
    total = int(lengths.sum())
    rows = torch.repeat_interleave(torch.arange(n_queries).repeat_interleave(n_tokens), lengths)
    starts = torch.repeat_interleave(index.indptr[flat] - (lengths.cumsum(0) - lengths), lengths)
    at = starts + torch.arange(total)
    acc = torch.zeros(n_queries * index.n_items)
    acc.index_add_(0, rows * index.n_items + index.items[at].to(torch.int64), index.scores[at].to(torch.float32))
    return torch.topk(acc.view(n_queries, index.n_items), k, dim=1)


def memory_child(n_queries: int, backend: str) -> None:
    """Run in a fresh process: build the index, then search n_queries and print the
    peak RSS during the search (the whole process: torch, index and results)."""
    cfg = R1_CPU
    index = random_index(cfg["n_codes"], cfg["n_items"], cfg["mean_postings"], skew=cfg["skew"], seed=1)
    codes = random_codes(n_queries, cfg["n_tokens"], cfg["n_codes"], skew=cfg["skew"], seed=3)
    engine = Engine(index, backend=backend)
    engine.search(codes[:1], k=cfg["k"])  # derived layouts are built once per index
    reset_peak_rss()
    before = current_rss_bytes()
    result = engine.search(codes, k=cfg["k"])
    assert result.ids.shape == (n_queries, cfg["k"])
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "rss_before_search_bytes": before,
                      "search_added_bytes": peak_rss_bytes() - before}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the JSON here")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-queries", type=int, default=100_000)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_queries, args.memory_child)
        return {}

    cfg = R1_CPU
    index = random_index(cfg["n_codes"], cfg["n_items"], cfg["mean_postings"], skew=cfg["skew"], seed=1)
    backends = ["torch"] + (["numba"] if importlib.util.find_spec("numba") else [])
    engines = {b: Engine(index, backend=b) for b in backends}
    batches = [random_codes(cfg["batch"], cfg["n_tokens"], cfg["n_codes"], skew=cfg["skew"], seed=10 + i) for i in range(4)]
    postings = sum(int(index.lengths[b].sum()) for b in batches) / len(batches)
    # check once that both paths agree on the scores they return
    slow = dense_search(index, batches[0], cfg["k"]).values
    for engine in engines.values():
        torch.testing.assert_close(engine.search(batches[0], k=cfg["k"]).scores, slow, rtol=1e-5, atol=1e-6)

    turn = {"i": 0}

    def fresh() -> torch.Tensor:  # a different batch every call, no cache effects
        turn["i"] += 1
        return batches[turn["i"] % len(batches)]

    results = {}
    for _ in range(2):  # interleave the two methods twice against machine drift
        runs = [(f"sparcode-{b}", lambda e=e: e.search(fresh(), k=cfg["k"])) for b, e in engines.items()]
        for name, run in runs + [("dense-accumulate-topk", lambda: dense_search(index, fresh(), cfg["k"]))]:
            t = median_seconds(run, repeats=args.repeats)
            results.setdefault(name, []).append(t)
    summary = {}
    for name, runs in results.items():
        med = sorted(r["median_s"] for r in runs)[len(runs) // 2]
        summary[name] = {
            "qps_median": cfg["batch"] / med,
            "qps_min": cfg["batch"] / max(r["max_s"] for r in runs),
            "qps_max": cfg["batch"] / min(r["min_s"] for r in runs),
            "postings_per_s": postings / med,
        }
    dense = summary["dense-accumulate-topk"]["qps_median"]
    speedup = {f"sparcode-{b}": summary[f"sparcode-{b}"]["qps_median"] / dense for b in backends}
    memory = {}
    for backend in backends:
        child = subprocess.run(
            [sys.executable, "-m", "sparcode.bench.cpu_search", "--memory-child", backend,
             "--memory-queries", str(args.memory_queries)],
            capture_output=True, text=True, check=True,
        )
        memory[f"sparcode-{backend}"] = json.loads(child.stdout.strip().splitlines()[-1])
    report = {
        "benchmark": "cpu_search R1-cpu",
        "date": date.today().isoformat(),
        "device": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": cfg,
        "index": {k: v for k, v in index.stats().items() if k != "device"},
        "mean_postings_per_query": postings / cfg["batch"],
        "methods": summary,
        "speedup_vs_dense": speedup,
        "memory": {"n_queries": args.memory_queries, **memory},
    }
    text = json.dumps(report, indent=2)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    print(text)
    print(f"\n{report['device']}, R1 at CPU scale, B = {cfg['batch']}:")
    print(f"{'method':<24}{'queries/s':>12}{'vs dense':>10}{'peak RSS at B=' + format(args.memory_queries, ','):>26}")
    for name, entry in summary.items():
        peak = memory.get(name, {}).get("peak_rss_bytes")
        print(f"{name:<24}{entry['qps_median']:>12,.0f}{entry['qps_median'] / dense:>9.1f}x"
              f"{(f'{peak / 2**30:.2f} GiB' if peak else '-'):>26}")
    return report


if __name__ == "__main__":
    main()
