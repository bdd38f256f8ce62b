"""Training epoch time of a TwoTower on CPU: history pooling through ``WeightedBag``
(one gradient row per distinct item) against ``F.embedding_bag(sparse=True)`` (one
row per history slot, coalesced by the optimizer), one epoch each, in the same run.

    python -m sparcode.bench.train_step [--data bars --path DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from sparcode.engine import encoder
from sparcode.engine.atomic import atomic_write_text
from sparcode.training import defaults
from sparcode.training.checkpoint import load_data
from sparcode.training.train import TrainConfig, fit, make_model, validator

from .timing import cpu_name


def embedding_bag_pooling(ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The reference: the same sums, with torch's sparse gradient of one row per slot."""
    return F.embedding_bag(ids, table, mode="sum", per_sample_weights=weights, sparse=True)


def epoch_seconds(data, cfg: TrainConfig) -> dict:
    """One TwoTower epoch from the same seed: its training seconds and validation Recall@20."""
    torch.manual_seed(cfg.seed)
    model = make_model("two_tower", data)
    info = fit(model, data, cfg, validator(data, cfg))
    return {"train_seconds": info["train_seconds"], "valid_recall@20": info["best_valid_recall@20"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="synthetic (the demo's 2,000 x 800) or a loader name")
    p.add_argument("--path", type=Path)
    p.add_argument("--out", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    data = load_data(args.data, args.path, 0)
    cfg = TrainConfig(epochs=1, device="cpu", seed=0, progress=False, valid_users=200, lr=defaults.lr("two_tower"))
    report = {"command": " ".join(["python -m sparcode.bench.train_step", *argv]), "dataset": data.name,
              "cpu": cpu_name(), "threads": torch.get_num_threads(), "date": str(date.today()),
              "python": platform.python_version(), "torch": torch.__version__, "batch_size": cfg.batch_size}
    report["weighted_bag"] = epoch_seconds(data, cfg)
    with mock.patch.object(encoder.WeightedBag, "apply", embedding_bag_pooling):
        report["embedding_bag"] = epoch_seconds(data, cfg)
    report["speedup"] = report["embedding_bag"]["train_seconds"] / report["weighted_bag"]["train_seconds"]
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    print(text, end="")
    return report


if __name__ == "__main__":
    main()
