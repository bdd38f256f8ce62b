"""``sparcode demo``: the whole pipeline on an embedded default, in a few minutes on CPU.

Synthetic data (or a real dataset) -> train SparCode and TwoTower -> export the index
-> ``recommend`` for every user (Parquet parts) -> evaluate what was written -> a table.
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

from sparcode.engine.recommend import run_job

from . import defaults
from .checkpoint import load_data
from .evaluate import encode_users, evaluate_exact, seen_items
from .export import export_index
from .metrics import ranking_metrics
from .models import SparCode
from .train import TrainConfig, fit, make_model, tensors, validator

SIZES = {  # users, items, epochs, codewords per sub-codebook
    "tiny": (600, 300, 2, 16),
    "default": (2000, 800, 8, 32),
}
SCORER = (128, 128)  # smaller than the released [256, 256, 256] so the demo fits in minutes on CPU
NEGATIVES = 20  # shared negatives per batch (training's default is 100): the demo's CPU budget
DENSITY = 0.2  # export target: the trained bias alone leaves too few candidates on 800 items


def run_demo(out: Path, *, data_name: str = "synthetic", path: Path | None = None, size: str = "default",
             seed: int = 0, device: str | None = None, progress: bool = True) -> list[dict]:
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    data = load_data(data_name, path, seed, SIZES[size][:2])
    _, _, epochs, n_words = SIZES[size]
    cfg = TrainConfig(epochs=epochs, negatives=NEGATIVES, device=device, seed=seed, progress=progress, valid_users=500)
    evaluate = validator(data, cfg)
    out.mkdir(parents=True, exist_ok=True)
    t = tensors(data, cfg)
    rows = []

    # SparCode: train, export, recommend through the engine, evaluate what was written
    model = SparCode(data, n_words=n_words, hidden=SCORER).to(device)
    info = fit(model, data, cfg, evaluate)
    item_features = t["item_features"]
    index, export = export_index(model, item_features, data.n_items, density=DENSITY, seed=seed)
    index.save(out / "index", overwrite=True, encoder=model.encoder)
    np.save(out / "codes.npy", encode_users(model, data, cfg))
    pq.write_table(pa.table({"user_id": np.arange(data.n_users), "item_ids": seen_items(data)}), out / "seen.parquet")
    shutil.rmtree(out / "recommendations", ignore_errors=True)  # a rerun of the demo replaces its own results
    summary = run_job(out / "index", out / "codes.npy", out / "recommendations", k=50,
                      exclude_path=out / "seen.parquet", batch_size=1024, device=device, progress=progress)
    table = pq.read_table(sorted((out / "recommendations").glob("part-*.parquet"))).to_pydict()
    ranked = np.array(table["item_ids"], dtype=np.int64)
    users = np.array(table["user_id"], dtype=np.int64)
    metrics = ranking_metrics(ranked, data.test, users)
    rows.append({"model": "sparcode", **_pick(metrics), "queries_per_s": summary.queries_per_s,
                 "index_bytes": export["index_bytes"], "density": export["density"], "epochs": info["epochs"]})

    # TwoTower: same tokenizer and budget, exact maximum inner product over all items
    tower = make_model("two_tower", data).to(device)
    info = fit(tower, data, replace(cfg, lr=defaults.lr("two_tower")), evaluate)
    metrics = evaluate_exact(tower, data, cfg)
    rows.append({"model": "two_tower", **_pick(metrics), "queries_per_s": metrics["queries_per_s"],
                 "index_bytes": data.n_items * tower.tokenizer.dim * 4, "density": None, "epochs": info["epochs"]})

    report = {"dataset": data.name, "device": device, "size": size, "seed": seed, "models": rows,
              "seconds": time.perf_counter() - started, "outputs": str(out)}
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    return rows


def _pick(metrics: dict) -> dict:
    return {"recall@20": metrics["recall@20"], "ndcg@20": metrics["ndcg@20"], "recall@50": metrics["recall@50"]}


def format_table(rows: list[dict], device: str) -> str:
    lines = [f"{'model':<11}{'Recall@20':>10}{'NDCG@20':>9}{'queries/s':>12}{'index MB':>10}  device",]
    for r in rows:
        lines.append(f"{r['model']:<11}{r['recall@20']:>10.4f}{r['ndcg@20']:>9.4f}{r['queries_per_s']:>12,.0f}"
                     f"{r['index_bytes'] / 2**20:>10.2f}  {device}")
    return "\n".join(lines)
