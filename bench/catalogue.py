"""Item codes end to end on a generated catalogue: interactions file in, every user's
top k out, through the commands a user runs, each timed with its peak resident memory.

The catalogue: ``--items`` items in clusters of 1,000 with a power-law (Zipf)
popularity both overall and within each cluster; ``--users`` users, each with one
cluster of interest, history lengths log-normal (median 12, heavy tail, 2 to 1,000
items), 70% of a history drawn from the user's cluster and the rest from the whole
catalogue; duplicates dropped. Steps: ``sparcode item-codes --data interactions --fit
neighbours --cap CAP``, then ``sparcode recommend`` with every user's history excluded,
SIGKILLed after ``--kill-after`` seconds and run again to finish (it resumes), then
every user's row is checked to be there exactly once.

    python -m sparcode.bench.catalogue --items 1000000 --users 2000000 --dir WORK --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparcode.engine.atomic import atomic_write, atomic_write_text

from .harness import device_label

CLUSTER = 1000  # items per cluster
IN_CLUSTER = 0.7  # the share of a history drawn from the user's cluster
ZIPF = 1.0  # popularity exponent: the r-th most popular item is drawn in proportion to 1 / r**ZIPF


def generate(n_users: int, n_items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, item ids) int64 of the catalogue described in the module docstring, sorted by user."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(12), 1.0, n_users)), 2, 1000).astype(np.int64)
    users = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    order = rng.permutation(n_items)  # popularity rank -> item id
    weights = 1 / np.arange(1, n_items + 1) ** ZIPF
    overall = np.searchsorted(np.cumsum(weights) / weights.sum(), rng.random(users.size))
    n_clusters = max(1, n_items // CLUSTER)
    size = n_items // n_clusters
    within = np.cumsum(weights[:size]) / weights[:size].sum()
    interest = rng.integers(n_clusters, size=n_users)[users]
    clustered = interest * size + np.searchsorted(within, rng.random(users.size))
    items = order[np.minimum(np.where(rng.random(users.size) < IN_CLUSTER, clustered, overall), n_items - 1)]
    keys = np.unique(users * n_items + items)
    return keys // n_items, keys % n_items


def write_catalogue(path: Path, n_users: int, n_items: int, seed: int) -> dict:
    """Generate the catalogue into a Parquet file of (user_id, item_id): its size and seconds."""
    started = time.perf_counter()
    users, items = generate(n_users, n_items, seed)
    table = pa.table({"user_id": users, "item_id": items})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return {"seconds": time.perf_counter() - started, "interactions": int(users.size),
            "users": int(np.unique(users).size), "items": int(np.unique(items).size)}


def run(command: list[str], work: Path, kill_after: float | None = None) -> dict:
    """Run ``command``, SIGKILLed after ``kill_after`` seconds if given: wall seconds,
    peak resident bytes (this child's own) and how it ended."""
    started = time.perf_counter()
    child = subprocess.Popen(command)
    while True:  # wait4, not Popen.wait: it gives this child's own peak memory
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if kill_after is not None and time.perf_counter() - started > kill_after:
            os.kill(child.pid, signal.SIGKILL)
            kill_after = None
        time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(command).replace(str(work), "WORK"), "seconds": time.perf_counter() - started,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "exit": child.returncode}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, required=True)
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--dir", type=Path, required=True, help="work directory (the interactions file, index, results)")
    p.add_argument("--out", type=Path, required=True, help="the JSON record")
    p.add_argument("--cap", type=int, default=100, help="items per code")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--kill-after", type=float, default=None, help="SIGKILL the first recommend run after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where item-codes solves and recommend searches (cpu or cuda)")
    args = p.parse_args(argv)

    args.dir.mkdir(parents=True, exist_ok=True)
    source = args.dir / "interactions.parquet"
    generated = write_catalogue(source, args.users, args.items, args.seed)
    print(json.dumps(generated), flush=True)
    codes = args.dir / "codes"
    results = args.dir / "recommendations"
    fit = run(["sparcode", "item-codes", "--data", "interactions", "--path", str(source), "--fit", "neighbours",
               "--cap", str(args.cap), "--device", args.device, "--out", str(codes)], args.dir)
    steps = {"fit": fit}
    if fit["exit"] == 0:
        recommend = ["sparcode", "recommend", str(codes / "index"), "--queries", str(codes / "queries.parquet"),
                     "--exclude", str(codes / "seen.parquet"), "--k", str(args.k), "--device", args.device,
                     "--out", str(results)]
        if args.kill_after is not None:
            steps["recommend_killed"] = run(recommend, args.dir, args.kill_after)
        steps["recommend"] = run(recommend, args.dir)
    report = {"command": f"python -m sparcode.bench.catalogue --items {args.items} --users {args.users} --dir WORK "
                         f"--out OUT --cap {args.cap} --k {args.k} --device {args.device}"
                         + (f" --kill-after {args.kill_after:g}" if args.kill_after is not None else ""),
              "date": date.today().isoformat(), "device": device_label(args.device), "generated": generated, "steps": steps}
    if steps.get("recommend", {}).get("exit") == 0:
        metrics = json.loads((codes / "metrics.json").read_text())
        index_bytes = sum(f.stat().st_size for f in (codes / "index").iterdir())
        written = pq.read_table(sorted(results.glob("part-*.parquet")), columns=["user_id", "item_ids"])
        ids = written.column("user_id").to_numpy()
        report["fit"] = {k: metrics[k] for k in ("fit_seconds", "fit", "neighbours", "cap")}
        report["index"] = {"bytes": index_bytes, "n_x_cap_x_8": args.items * args.cap * 8}
        report["recommendations"] = {"rows": len(ids), "distinct_users": int(np.unique(ids).size),
                                     "every_user_once": bool(len(ids) == generated["users"] == np.unique(ids).size)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report.get("recommendations", {}).get("every_user_once") else 1


if __name__ == "__main__":
    sys.exit(main())
