"""End-to-end throughput of ``sparcode recommend`` vs raw ``engine.search`` on the same
index and queries (R1 at CPU scale, 100,000 queries): reading queries, searching and
writing Parquet must not be the bottleneck.

    python -m sparcode.bench.recommend_throughput [--queries 100000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from sparcode.engine import Engine
from sparcode.engine.atomic import atomic_write_text
from sparcode.engine.recommend import run_job
from sparcode.engine.synthetic import random_codes

from .regimes import REGIMES, SKEW, build
from .timing import cpu_name


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    regime = REGIMES["R1"].scaled(10, 4)
    index, _ = build(regime, "cpu", n_batches=0)
    codes = random_codes(args.queries, regime.n_tokens, regime.n_codes, skew=SKEW, seed=42).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index.save(tmp / "ix")
        np.save(tmp / "codes.npy", codes)
        engine = Engine.load(tmp / "ix", device="cpu")
        engine.search(torch.from_numpy(codes[:8]), k=regime.k)  # compile and derive once
        start = time.perf_counter()
        for lo in range(0, args.queries, args.batch_size):
            engine.search(torch.from_numpy(codes[lo : lo + args.batch_size]), k=regime.k)
        raw = args.queries / (time.perf_counter() - start)
        summary = run_job(tmp / "ix", tmp / "codes.npy", tmp / "out", k=regime.k, batch_size=args.batch_size,
                          device="cpu", progress=False)
        job = summary.queries / summary.seconds
    report = {"benchmark": "recommend_throughput", "date": date.today().isoformat(), "device": cpu_name(),
              "config": {**regime.as_dict(), "queries": args.queries, "batch_size": args.batch_size},
              "backend": engine.backend.name, "raw_search_qps": raw, "recommend_qps": job, "ratio": job / raw,
              "recommend_setup_seconds": summary.setup_seconds,
              "note": "recommend_qps: the parts loop (read, search, write Parquet) after setup; raw: search only"}
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
