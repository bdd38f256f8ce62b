"""``sparcode demo``: the recommended pipeline beside a two-tower, in a few minutes on CPU.

Synthetic data (or a real dataset) -> graph-filter codes (each history item a code, the
filter's settings chosen on held-out training items), joined by feature codes where the
users have categorical features (their weight chosen on the validation split) -> the
index and every user's bag of codes -> ``recommend`` for every user (Parquet parts) ->
evaluate what was written; a TwoTower trained on the same data is scored exactly over all
items beside it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sparcode.engine.atomic import atomic_write, atomic_write_text
from sparcode.engine.queries import write_bags
from sparcode.engine.recommend import run_job

from . import defaults
from .checkpoint import load_data
from .ensemble import join_family
from .evaluate import evaluate_exact, seen_items
from .feature_codes import feature_family
from .graph_filter import fit_on_validation, grid_point, screened_caps
from .item_codes import history_bags
from .metrics import ranking_metrics
from .train import TrainConfig, fit, make_model, validator

SIZES = {  # users, items, TwoTower's most epochs (it stops after 10 without a better validation score)
    "tiny": (600, 300, 2),
    "default": (2000, 800, 60),
}


def run_demo(out: Path, *, data_name: str = "synthetic", path: Path | None = None, size: str = "default",
             seed: int = 0, device: str | None = None, progress: bool = True) -> list[dict]:
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    data = load_data(data_name, path, seed, SIZES[size][:2])
    epochs = SIZES[size][2]
    cfg = TrainConfig(epochs=epochs, device=device, seed=seed, progress=progress, valid_users=500)
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    # SparCode with graph-filter codes: fit, index, recommend through the engine, evaluate what was written
    fit_started = time.perf_counter()
    grid = [grid_point(text) for text in defaults.GRAPH_FILTER_GRID]
    caps = screened_caps(data.n_items)
    index, chosen, _ = fit_on_validation(data, caps, grid, seed=seed)
    bags, joined = history_bags(data.train), None
    if data.user_features is not None:
        index, bags, _, joined = join_family(data, index, bags, bags, feature_family(data, caps), seed=seed)
    fit_seconds = time.perf_counter() - fit_started
    index.save(out / "index", overwrite=True)
    write_bags(out / "queries.parquet", np.arange(data.n_users), *bags)
    seen = pa.table({"user_id": np.arange(data.n_users), "item_ids": seen_items(data)})
    atomic_write(out / "seen.parquet", lambda tmp: pq.write_table(seen, tmp))
    shutil.rmtree(out / "recommendations", ignore_errors=True)  # a rerun of the demo replaces its own results
    summary = run_job(out / "index", out / "queries.parquet", out / "recommendations", k=50,
                      exclude_path=out / "seen.parquet", batch_size=1024, device=device, progress=progress)
    table = pq.read_table(sorted((out / "recommendations").glob("part-*.parquet"))).to_pydict()
    ranked = np.array(table["item_ids"], dtype=np.int64)
    users = np.array(table["user_id"], dtype=np.int64)
    metrics = ranking_metrics(ranked, data.test, users)
    features = None if joined is None else {key: joined[key] for key in ("added", "power", "weight")}
    rows.append({"model": "sparcode", "codes": "graph filter" if not features or not features["weight"] else
                 "graph filter + features", **_pick(metrics), "queries_per_s": summary.queries_per_s,
                 "index_bytes": index.nbytes, "density": index.nnz / (index.n_codes * index.n_items),
                 "fit_seconds": fit_seconds, "alpha": chosen["alpha"], "vectors": chosen["vectors"], "cap": chosen["cap"],
                 "features": features})

    # TwoTower: exact maximum inner product over all items
    tower = make_model("two_tower", data).to(device)
    info = fit(tower, data, replace(cfg, lr=defaults.lr("two_tower")), validator(data, cfg))
    metrics = evaluate_exact(tower, data, cfg)
    rows.append({"model": "two_tower", **_pick(metrics), "queries_per_s": metrics["queries_per_s"],
                 "index_bytes": data.n_items * tower.tokenizer.dim * 4, "density": None, "epochs": info["epochs"],
                 "fit_seconds": info["train_seconds"]})

    report = {"dataset": data.name, "device": device, "size": size, "seed": seed, "models": rows,
              "seconds": time.perf_counter() - started, "outputs": str(out)}
    atomic_write_text(out / "demo.json", json.dumps(report, indent=2) + "\n")
    return rows


def _pick(metrics: dict) -> dict:
    return {"recall@20": metrics["recall@20"], "ndcg@20": metrics["ndcg@20"], "recall@50": metrics["recall@50"]}


def format_table(rows: list[dict], device: str) -> str:
    """One line per model, SparCode's named with its codes (e.g. "sparcode (graph filter + features)")."""
    names = [r["model"] + (f" ({r['codes']})" if "codes" in r else "") for r in rows]
    width = max(len("model"), *map(len, names)) + 2
    lines = [f"{'model':<{width}}{'Recall@20':>10}{'NDCG@20':>9}{'queries/s':>12}{'index MB':>10}{'fit s':>8}  device"]
    for name, r in zip(names, rows, strict=True):
        lines.append(f"{name:<{width}}{r['recall@20']:>10.4f}{r['ndcg@20']:>9.4f}{r['queries_per_s']:>12,.0f}"
                     f"{r['index_bytes'] / 2**20:>10.2f}{r['fit_seconds']:>8.0f}  {device}")
    return "\n".join(lines)
