"""The item-codes fit on a device beside its float64 reference: fit time, the relative
error of the float32 scores, how many of the float32 index's (code, item) pairs the
float64 index holds too, and test Recall/NDCG of both indexes.

    python -m sparcode.bench.gpu_item_codes --path DIR --out OUT [--device cuda]

Writes ``OUT/gpu-item-codes.json`` and prints one line per index.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import numpy as np
import torch

from sparcode.engine import CodeIndex, Engine
from sparcode.engine.atomic import atomic_write_text
from sparcode.training import defaults
from sparcode.training.checkpoint import load_data
from sparcode.training.evaluate import evaluate_engine
from sparcode.training.export import ExportRule
from sparcode.training.item_codes import history_bags, item_code_index, item_scores

from .breakdown import timed
from .harness import device_label


def pairs(index: CodeIndex) -> np.ndarray:
    """Every (code, item) pair of ``index`` as code * N + item."""
    codes = np.repeat(np.arange(len(index.indptr) - 1), np.diff(index.indptr.cpu().numpy()))
    return codes * index.n_items + index.items.cpu().numpy().astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="bars")
    p.add_argument("--path", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cap-density", type=float, default=0.01)
    p.add_argument("--keep", choices=defaults.ITEM_CODES_KEEPS, default="positive")
    args = p.parse_args(argv)

    data = load_data(args.data, args.path, seed=0)
    cap = ExportRule.top(args.cap_density, data.n_items).cap
    bags = history_bags(data.train)
    report: dict = {"command": f"python -m sparcode.bench.gpu_item_codes --data {args.data} --path DATA/{args.path.name} "
                               f"--out OUT --cap-density {args.cap_density} --keep {args.keep}",
                    "date": date.today().isoformat(), "device": device_label(args.device),
                    "torch": torch.__version__, "dataset": data.name, "n_items": data.n_items, "cap": cap,
                    "keep": args.keep}
    indexes = {}
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        scores, seconds = timed(lambda d=dtype: item_scores(data.train, data.n_items, device=args.device, dtype=d),
                                "cuda" if args.device.startswith("cuda") else "cpu")
        if name == "float32":
            reference32 = scores
        else:
            report["relative_error_float32"] = float((reference32.double() - scores).norm() / scores.norm())
            del reference32
        indexes[name] = item_code_index(scores, cap, keep=args.keep)
        del scores
        metrics = evaluate_engine(Engine(indexes[name]), bags, data)
        report[name] = {"fit_seconds": seconds, "nnz": indexes[name].items.numel(),
                        **{m: metrics[m] for m in ("recall@20", "ndcg@20", "recall@50")}}
        print(f"{name}: fit {seconds:.1f} s, Recall@20 {metrics['recall@20']:.5f}, NDCG@20 {metrics['ndcg@20']:.5f}",
              flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    shared = np.intersect1d(pairs(indexes["float32"]), pairs(indexes["float64"])).size
    report["pairs_shared"] = shared / max(indexes["float32"].items.numel(), 1)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "gpu-item-codes.json", json.dumps(report, indent=2) + "\n")
    print(f"relative error {report['relative_error_float32']:.2e}, pairs shared {report['pairs_shared']:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
