"""The neighbour fit against the exact fit on one dataset, every choice on validation:
each M of ``--neighbours`` and the exact fit are scored on the validation split (fit on
train), M is chosen by validation Recall@20, and the test split is read once for the
exact fit and once for the chosen M. Fit time and peak resident memory per fit
(Linux's peak counter reset before each).

    python -m sparcode.bench.neighbour_fit --data bars --path DIR --out FILE.json \\
        [--cap-density 0.01 | --cap N] [--keep positive] [--l2 10] [--neighbours 128 256 512]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

from sparcode.engine import Engine
from sparcode.engine.atomic import atomic_write_text
from sparcode.training import defaults
from sparcode.training.checkpoint import load_data
from sparcode.training.commands import code_cap
from sparcode.training.evaluate import evaluate_engine
from sparcode.training.item_codes import ease_rows, history_bags, rows_index
from sparcode.training.neighbour_fit import columns_index, neighbour_columns

from .harness import device_label
from .timing import peak_rss_bytes, reset_peak_rss

METRICS = ("recall@20", "ndcg@20", "recall@50")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="bars")
    p.add_argument("--path", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--cap-density", type=float, default=defaults.INDEX_DENSITY)
    cap.add_argument("--cap", type=int, default=None)
    p.add_argument("--keep", choices=defaults.ITEM_CODES_KEEPS, default=defaults.ITEM_CODES_KEEP)
    p.add_argument("--l2", type=float, default=defaults.ITEM_CODES_L2)
    p.add_argument("--neighbours", type=int, nargs="+", default=[128, 256, 512])
    args = p.parse_args(argv)

    data = load_data(args.data, args.path, seed=0)
    cap = code_cap(data.n_items, args.cap, args.cap_density)
    bags = history_bags(data.train)
    fits = {"exact": lambda: rows_index(ease_rows(data.train, data.n_items, l2_scale=args.l2), data.n_items, cap,
                                        keep=args.keep)}
    for m in args.neighbours:
        fits[f"neighbours-{m}"] = lambda m=m: columns_index(
            *neighbour_columns(data.train, data.n_items, neighbours=m, l2_scale=args.l2), data.n_items, cap, keep=args.keep)
    rows, indexes = [], {}
    for name, fit in fits.items():
        reset_peak_rss()
        started = time.perf_counter()
        index = fit()
        seconds = time.perf_counter() - started
        valid = evaluate_engine(Engine(index), bags, data, split="valid")
        rows.append({"fit": name, "fit_and_index_seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "nnz": index.nnz,
                     **{f"valid_{k}": valid[k] for k in METRICS}})
        indexes[name] = index
        print(json.dumps(rows[-1]), flush=True)
    chosen = max((r for r in rows if r["fit"] != "exact"), key=lambda r: r["valid_recall@20"])["fit"]
    for row in rows:
        if row["fit"] in ("exact", chosen):
            test = evaluate_engine(Engine(indexes[row["fit"]]), bags, data)
            row.update({f"test_{k}": test[k] for k in METRICS})
    exact, best = (next(r for r in rows if r["fit"] == name) for name in ("exact", chosen))
    cap_flag = f"--cap {args.cap}" if args.cap is not None else f"--cap-density {args.cap_density}"
    report = {"command": f"python -m sparcode.bench.neighbour_fit --data {args.data} --path DATA/{args.path.name} "
                         f"--out OUT {cap_flag} --keep {args.keep} --l2 {args.l2} "
                         f"--neighbours {' '.join(map(str, args.neighbours))}",
              "date": date.today().isoformat(), "device": device_label("cpu"), "dataset": data.name,
              "n_users": data.n_users, "n_items": data.n_items, "cap": cap, "keep": args.keep, "l2_scale": args.l2,
              "chosen_on_validation": chosen, "fits": rows,
              "test_recall@20_ratio": best["test_recall@20"] / exact["test_recall@20"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"{data.name}: {chosen} chosen on validation; test Recall@20 {best['test_recall@20']:.4f} against the exact "
          f"fit's {exact['test_recall@20']:.4f} ({report['test_recall@20_ratio']:.4f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
