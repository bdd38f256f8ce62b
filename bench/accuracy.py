"""Accuracy on record: train SparCode, TwoTower and AllToAll on one dataset with the same
tokenizer and budget, evaluate them as BARS defines (full ranking,
training items excluded), and write ``accuracy-<dataset>.json``.

    python -m sparcode.bench.accuracy --dataset gowalla --path DATA/gowalla_m1 --out bench/results
    python -m sparcode.bench.accuracy --dataset ml-1m --path DATA/ml-1m --out bench/results
    python -m sparcode.bench.accuracy --dataset synthetic --out bench/results

SparCode is measured through its exported index and ``Engine.search`` (what is served is
what is measured); TwoTower by exact maximum inner product over all items; AllToAll by
scoring every item for a seeded sample of users. ``--densities`` adds the sparsity curve:
the same SparCode model exported at each target density (1 = every pair kept, as
softplus(scorer + b): the unsparsified model) and searched. The headline index and the
curve's come from one scoring pass over all codes x items.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

import numpy as np
import torch

from sparcode.engine import CodeIndex, Engine
from sparcode.engine.atomic import atomic_write_text
from sparcode.engine.encoder import QUANTIZERS
from sparcode.training import defaults
from sparcode.training.checkpoint import load_data
from sparcode.training.data import SYNTHETIC_PER_USER
from sparcode.training.ensemble import join_family
from sparcode.training.evaluate import encode_users, evaluate_engine, evaluate_exact
from sparcode.training.export import ExportRule, export_indexes
from sparcode.training.feature_codes import feature_family
from sparcode.training.graph_filter import fit_on_validation, grid_point, screened_caps
from sparcode.training.item_codes import history_bags, item_code_index, item_scores, ridge
from sparcode.training.tower_codes import tower_family
from sparcode.training.train import TrainConfig, fit, make_model, tensors, validator
from sparcode.training.warm import model_kwargs as warm_kwargs
from sparcode.training.warm import warm_start

from .harness import device_label

DATASETS = {  # name -> (loader name, headline metric)
    "gowalla": ("bars", "recall@20"),
    "ml-1m": ("ml-1m", "recall@50"),
    "ml-100k": ("ml-100k", "recall@20"),
    "synthetic": ("synthetic", "recall@20"),
}
REFERENCES = {  # the BARS leaderboard on gowalla_m1
    "gowalla": {"source": "BARS leaderboard, gowalla_m1 (reczoo.github.io/BARS)",
                "YoutubeDNN": {"recall@20": 0.1754, "ndcg@20": 0.1473, "recall@50": 0.2711, "ndcg@50": 0.1772},
                "MF-BPR": {"recall@20": 0.1627, "ndcg@20": 0.1378},
                "LightGCN": {"recall@20": 0.1820, "ndcg@20": 0.1547},
                "SimpleX": {"recall@20": 0.1872, "ndcg@20": 0.1557, "recall@50": 0.2874, "ndcg@50": 0.1868}},
}
MODELS = ["two_tower", "sparcode", "sparcode_warm", "item_codes", "graph_filter", "graph_filter_tower", "graph_filter_features",
          "all_to_all"]
METRICS = [f"{m}@{k}" for m in ("recall", "ndcg", "precision", "hitrate") for k in (10, 20, 50)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="accuracy of SparCode, TwoTower and AllToAll on one dataset")
    p.add_argument("--dataset", required=True, choices=list(DATASETS))
    p.add_argument("--path", type=Path, default=None, help="dataset directory (not needed for synthetic)")
    p.add_argument("--out", type=Path, required=True, help="directory for accuracy-<dataset>.json")
    p.add_argument("--models", nargs="+", default=["two_tower", "sparcode", "all_to_all"], choices=MODELS,
                   help="sparcode_warm: SparCode started from this run's TwoTower (list two_tower before it); "
                        "item_codes: SparCode whose codes are the history items (training/item_codes.py); "
                        "graph_filter_tower: this run's graph_filter and two_tower (list both before it) as two code "
                        "families in one index (training/ensemble.py); graph_filter_features: this run's graph_filter "
                        "and the users' feature codes (training/feature_codes.py) in one index")
    p.add_argument("--device", default=None)
    p.add_argument("--epochs", type=int, default=defaults.EPOCHS)
    p.add_argument("--time-budget", type=float, default=None,
                   help=f"training seconds per model (default: {defaults.CPU_TIME_BUDGET:,.0f} on a CPU, none on a GPU; "
                        "0 for none)")
    p.add_argument("--warm-epochs", type=int, default=None,
                   help="sparcode_warm's epochs (default: --epochs); 0: the two-tower converted without training")
    p.add_argument("--warmup", type=int, default=0, help="SparCode: epochs without quantization first")
    p.add_argument("--commitment", type=float, default=defaults.COMMITMENT,
                   help="SparCode: weight of the quantizer's commitment loss")
    p.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE)
    p.add_argument("--negatives", type=int, default=defaults.NEGATIVES)
    p.add_argument("--sampling", default=None, choices=defaults.SAMPLINGS,
                   help="SparCode's and AllToAll's negatives (default: popularity; uniform with --train-density)")
    p.add_argument("--two-tower-sampling", default=None, choices=defaults.SAMPLINGS,
                   help="TwoTower's negatives (default: in-batch). Its dot product makes many negatives cheap, "
                        "so the baseline gets the stronger recipe that the scorer MLP cannot afford")
    p.add_argument("--two-tower-negatives", type=int, default=None, help="TwoTower's own --negatives")
    p.add_argument("--two-tower-temperature", type=float, default=defaults.TEMPERATURE,
                   help="TwoTower: its scores are cosine similarities over this temperature")
    p.add_argument("--two-tower-dim", type=int, default=defaults.TWO_TOWER_DIM, help="TwoTower's embedding size")
    p.add_argument("--two-tower-hidden", type=int, nargs="*", default=list(defaults.TWO_TOWER_TOKENIZER_HIDDEN),
                   help="TwoTower's user-side MLP widths over the pooled history and features (default none: one "
                        "linear map)")
    p.add_argument("--two-tower-lr", type=float, default=defaults.TWO_TOWER_LR, help="TwoTower's learning rate")
    p.add_argument("--lr", type=float, default=defaults.LR, help="SparCode's and AllToAll's learning rate")
    p.add_argument("--l2", type=float, default=defaults.L2,
                   help="weight of the squared norm of each batch's item vectors (all models)")
    p.add_argument("--patience", type=int, default=defaults.PATIENCE)
    p.add_argument("--valid-users", type=int, default=defaults.VALID_USERS,
                   help="users whose validation Recall@20 drives early stopping (all models)")
    p.add_argument("--tokens", type=int, default=defaults.TOKENS)
    p.add_argument("--dim", type=int, default=defaults.DIM,
                   help="token and item embedding size of SparCode and AllToAll (a warm start takes the two-tower's)")
    p.add_argument("--codewords", type=int, default=None,
                   help=f"C per codebook (default: {defaults.GPU_CODEWORDS} on a GPU, {defaults.CPU_CODEWORDS} on a CPU)")
    p.add_argument("--quantizer", default=defaults.QUANTIZER, choices=sorted(QUANTIZERS),
                   help="SparCode: residual or product (the paper's) quantization")
    p.add_argument("--per-token-codebooks", action=argparse.BooleanOptionalAction, default=defaults.PER_TOKEN,
                   help="SparCode: one quantizer per token position, V = T * C**2, or one shared, V = C**2")
    p.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=defaults.FEEDBACK,
                   help="SparCode with per-token codebooks: each position also quantizes the error the positions "
                        "before it left")
    p.add_argument("--hidden", type=int, nargs="+", default=None,
                   help=f"scorer MLP widths (default: {' '.join(map(str, defaults.GPU_HIDDEN))} on a GPU, "
                        f"{' '.join(map(str, defaults.CPU_HIDDEN))} on a CPU)")
    p.add_argument("--embedding-std", type=float, default=defaults.EMBEDDING_STD,
                   help="initial std of the embeddings (all models)")
    p.add_argument("--item-codes-l2", type=float, default=defaults.ITEM_CODES_L2,
                   help="item_codes: l2 weight as a multiple of the mean item's training interactions")
    p.add_argument("--item-codes-keep", choices=defaults.ITEM_CODES_KEEPS, default=defaults.ITEM_CODES_KEEP,
                   help="item_codes: each code's largest scores by magnitude or its highest positive ones")
    p.add_argument("--graph-filter-grid", nargs="+", default=list(defaults.GRAPH_FILTER_GRID), metavar="ALPHA:VECTORS[:EASE]",
                   help="graph_filter: the settings screened on the validation split (the best by the headline "
                        "metric is read on the test split once)")
    p.add_argument("--graph-filter-caps", type=int, nargs="+", default=None, metavar="N",
                   help="graph_filter: the items per code screened on validation with the grid (default: "
                        f"{', '.join(f'{f:g}' for f in defaults.GRAPH_FILTER_CAP_DENSITIES)} x N, at most "
                        f"{defaults.ITEM_CODES_CAP})")
    p.add_argument("--graph-filter-split", choices=defaults.GRAPH_FILTER_SPLITS, default=defaults.GRAPH_FILTER_SPLIT,
                   help="graph_filter: screen on the validation split, or on 10%% of every user's training items, at "
                        "random (wide) or the end of each list (tail: lists in time order), and refit the chosen "
                        "setting on the training split; auto: tail where the test split is by time")
    p.add_argument("--graph-filter-folds", type=int, choices=range(1, 11), default=defaults.GRAPH_FILTER_FOLDS,
                   metavar="1..10", help="graph_filter: disjoint 10%% slices a wide screen averages")
    p.add_argument("--graph-filter-keeps", nargs="+", choices=defaults.ITEM_CODES_KEEPS,
                   default=list(defaults.GRAPH_FILTER_KEEPS), help="graph_filter: keep rules screened with the grid")
    p.add_argument("--tower-levels", type=int, default=defaults.TOWER_CODE_LEVELS,
                   help="graph_filter_tower: residual k-means levels of the tower codes (codes per user)")
    p.add_argument("--tower-size", type=int, default=defaults.TOWER_CODE_SIZE,
                   help="graph_filter_tower: centres per level")
    p.add_argument("--ensemble-powers", type=float, nargs="+", default=list(defaults.ENSEMBLE_POWERS),
                   help="graph_filter_tower: the graph-filter codes' weight 1 / |history|^p, p screened on validation")
    p.add_argument("--ensemble-weights", type=float, nargs="+", default=list(defaults.ENSEMBLE_WEIGHTS),
                   help="graph_filter_tower: the tower codes' relative weights screened on validation")
    p.add_argument("--all-to-all-sample", type=int, default=5000, help="users scored exactly for AllToAll")
    headline = p.add_mutually_exclusive_group()
    headline.add_argument("--density", type=float, default=None,
                          help="SparCode export: target density by one bias for all codes")
    headline.add_argument("--cap-density", type=float, default=None,
                          help="SparCode export: target density by the per-code rule, each code's top FRACTION x N "
                               f"items (export --density 1 --cap; the default, at {defaults.INDEX_DENSITY:g})")
    p.add_argument("--train-density", type=float, default=None,
                   help="SparCode: train for an index of this density (the bias follows a score quantile)")
    p.add_argument("--densities", type=float, nargs="*", default=[], help="sparsity curve: target densities")
    p.add_argument("--cap-densities", type=float, nargs="*", default=[],
                   help="sparsity curve by the per-code rule: each code keeps its top FRACTION x N items "
                        "(export --density 1 --cap), so no code's list is empty; item_codes get their own curve")
    p.add_argument("--synthetic-size", type=int, nargs=2, default=[2000, 800], metavar=("USERS", "ITEMS"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for flag, value in (("--dim", args.dim), ("--two-tower-dim", args.two_tower_dim), ("--tokens", args.tokens),
                        ("--codewords", args.codewords), ("--all-to-all-sample", args.all_to_all_sample),
                        ("--tower-levels", args.tower_levels), ("--tower-size", args.tower_size),
                        *(("--hidden", width) for width in args.hidden or ()),
                        *(("--two-tower-hidden", width) for width in args.two_tower_hidden),
                        *(("--synthetic-size", size) for size in args.synthetic_size)):
        if value is not None and value < 1:
            p.error(f"{flag}: expected a positive integer, got {value}")
    if args.epochs < 1:
        p.error(f"--epochs: expected >= 1, got {args.epochs} (--warm-epochs 0 converts the two-tower without training)")
    if args.warm_epochs is not None and (args.warm_epochs < 0 or "sparcode_warm" not in args.models):
        p.error(f"--warm-epochs: expected >= 0 epochs of sparcode_warm, listed in --models; got {args.warm_epochs} "
                f"with --models {' '.join(args.models)}")
    if args.synthetic_size[1] < SYNTHETIC_PER_USER:
        p.error(f"--synthetic-size: expected at least {SYNTHETIC_PER_USER} items (each user draws as many), "
                f"got {args.synthetic_size[1]}")
    for flag, value in (("--lr", args.lr), ("--two-tower-lr", args.two_tower_lr), ("--item-codes-l2", args.item_codes_l2),
                        ("--two-tower-temperature", args.two_tower_temperature), ("--embedding-std", args.embedding_std)):
        if not value > 0:
            p.error(f"{flag}: expected a positive number, got {value:g}")
    for flag, values in (("--density", [args.density]), ("--cap-density", [args.cap_density]),
                         ("--densities", args.densities), ("--cap-densities", args.cap_densities)):
        bad = [v for v in values if v is not None and not 0 < v <= 1]
        if bad:
            p.error(f"{flag}: expected fractions in (0, 1], got {bad[0]:g}")
    if args.density is not None and ("item_codes" in args.models or "graph_filter" in args.models):
        p.error("--density: item_codes and graph_filter keep each code's top items; give --cap-density")
    try:
        args.graph_filter_grid = [grid_point(text) for text in args.graph_filter_grid]
    except ValueError as exc:
        p.error(f"--graph-filter-grid: {exc}")
    if args.graph_filter_caps is not None:
        if min(args.graph_filter_caps) < 1:
            p.error(f"--graph-filter-caps: expected positive numbers of items, got {min(args.graph_filter_caps)}")
        if args.density is not None or args.cap_density is not None:
            p.error("--graph-filter-caps: screens caps on validation; not with --density or --cap-density")
    args.screen_caps = args.density is None and args.cap_density is None  # graph_filter: chosen on validation
    if args.screen_caps:
        args.cap_density = defaults.INDEX_DENSITY
    bad = [v for v in args.ensemble_powers + args.ensemble_weights if not v >= 0]
    if bad:
        p.error(f"--ensemble-powers, --ensemble-weights: expected numbers >= 0, got {bad[0]:g}")
    for joined, needs in (("graph_filter_tower", ("two_tower", "graph_filter")), ("graph_filter_features", ("graph_filter",))):
        if joined in args.models and any(m not in args.models[: args.models.index(joined)] for m in needs):
            p.error(f"--models: {joined} joins this run's {' and '.join(needs)}; list {'both' if len(needs) > 1 else 'it'} "
                    "before it")
    if "sparcode_warm" in args.models and ("two_tower" not in args.models
                                           or args.models.index("two_tower") > args.models.index("sparcode_warm")):
        p.error("--models: sparcode_warm starts from this run's two_tower; list two_tower before it")
    try:  # option values that TrainConfig rejects fail here, before any data is read
        train_configs(args, "cpu")
    except ValueError as exc:
        p.error(str(exc))
    return args


def train_configs(args: argparse.Namespace, device: str) -> tuple[TrainConfig, TrainConfig, TrainConfig]:
    """The training config of SparCode and AllToAll; TwoTower's, the same but for its own
    negatives and rate; sparcode_warm's, the same but for ``--warm-epochs``."""
    budget = defaults.time_budget(device) if args.time_budget is None else args.time_budget
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, negatives=args.negatives,
                      sampling=args.sampling or defaults.sampling("sparcode", args.train_density),
                      lr=args.lr, l2=args.l2, patience=args.patience, seed=args.seed, device=device,
                      progress=not args.no_progress, time_budget=budget or None, warmup=args.warmup,
                      density=args.train_density, commitment=args.commitment, valid_users=args.valid_users)
    try:
        two_tower = replace(cfg, sampling=args.two_tower_sampling or defaults.sampling("two_tower"), density=None,
                            lr=args.two_tower_lr,
                            negatives=cfg.negatives if args.two_tower_negatives is None else args.two_tower_negatives)
    except ValueError as exc:
        raise ValueError(f"--two-tower-sampling / --two-tower-negatives: {exc}") from None
    try:
        warm = cfg if args.warm_epochs is None else replace(cfg, epochs=args.warm_epochs)
    except ValueError as exc:
        raise ValueError(f"--warm-epochs: {exc}") from None
    return cfg, two_tower, warm


def model_config(args: argparse.Namespace, device: str) -> dict:
    """The models' settings as the report records them: SparCode's and AllToAll's keyword
    arguments, V, the TwoTower's own embedding size and the item codes' l2 scale and keep rule."""
    codewords = args.codewords or defaults.codewords(device)
    return {"dim": args.dim, "n_tokens": args.tokens, "n_words": codewords,
            "hidden": tuple(args.hidden or defaults.hidden(device)), "embedding_std": args.embedding_std,
            "quantizer": args.quantizer, "per_token": args.per_token_codebooks, "feedback": args.error_feedback,
            "temperature": args.two_tower_temperature,
            "codes": codewords**2 * (args.tokens if args.per_token_codebooks else 1), "two_tower_dim": args.two_tower_dim,
            "two_tower_hidden": list(args.two_tower_hidden),
            "item_codes_l2": args.item_codes_l2, "item_codes_keep": args.item_codes_keep,
            "graph_filter_grid": [list(point) for point in args.graph_filter_grid],
            "graph_filter_keeps": list(args.graph_filter_keeps), "graph_filter_split": args.graph_filter_split,
            "graph_filter_folds": args.graph_filter_folds, "tower_levels": args.tower_levels,
            "tower_size": args.tower_size, "ensemble_powers": list(args.ensemble_powers),
            "ensemble_weights": list(args.ensemble_weights)}


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 products: the scorer MLP dominates
        torch.backends.cudnn.allow_tf32 = True
    loader, headline = DATASETS[args.dataset]
    data = load_data(loader, args.path, args.seed, tuple(args.synthetic_size))
    cfg, cfg_two_tower, cfg_warm = train_configs(args, device)
    models = model_config(args, device)
    model_kwargs = {k: v for k, v in models.items()
                    if k not in ("codes", "two_tower_dim", "two_tower_hidden", "item_codes_l2", "item_codes_keep",
                                 "graph_filter_grid", "graph_filter_keeps", "graph_filter_split", "graph_filter_folds",
                                 "tower_levels", "tower_size", "ensemble_powers", "ensemble_weights")}
    two_tower_kwargs = {**model_kwargs, "dim": models["two_tower_dim"], "tokenizer_hidden": tuple(models["two_tower_hidden"])}
    validate = validator(data, cfg)
    t = tensors(data, cfg)
    item_features = t["item_features"]
    report: dict = {"dataset": args.dataset, "command": "python -m sparcode.bench.accuracy " + shlex.join(argv),
                    "date": date.today().isoformat(), "device": device_label(device), "torch": torch.__version__,
                    "seed": args.seed, "headline_metric": headline,
                    "data": {"users": data.n_users, "items": data.n_items, "train": int(data.train.items.size),
                             "valid": int(data.valid.items.size), "test": int(data.test.items.size)},
                    "config": {"train": asdict(cfg), "model": models}, "models": {}}
    if cfg_two_tower != cfg:
        report["config"]["train_two_tower"] = asdict(cfg_two_tower)
    if cfg_warm != cfg:
        report["config"]["train_warm"] = asdict(cfg_warm)
    if args.dataset in REFERENCES:
        report["references"] = REFERENCES[args.dataset]
    two_tower = graph_filter = None
    curve_model = "sparcode_warm" if "sparcode_warm" in args.models else "sparcode"
    for kind in args.models:
        torch.manual_seed(args.seed)
        if kind in ("item_codes", "graph_filter", "graph_filter_tower", "graph_filter_features"):
            if kind == "item_codes":
                entry = item_codes_entry(args, data, device)
            elif kind == "graph_filter":
                entry, graph_filter = graph_filter_entry(args, data, headline)
            elif kind == "graph_filter_features":
                entry = graph_filter_features_entry(args, data, headline, graph_filter, report["models"]["graph_filter"])
            else:
                entry = graph_filter_tower_entry(args, data, headline, graph_filter, report["models"]["graph_filter"],
                                                 two_tower, cfg_two_tower)
            report["models"][kind] = entry
            print(f"[accuracy] {args.dataset} {kind}: {headline} {entry[headline]:.4f} recall@20 {entry['recall@20']:.4f} "
                  f"(fit {entry['train_seconds']:.0f} s)", flush=True)
            write(args.out, report, started)
            continue
        warm = kind == "sparcode_warm"
        if warm:
            model = make_model("sparcode", data, **{**model_kwargs, **warm_kwargs(two_tower)})
            started_warm = time.perf_counter()
            warm_start(model, two_tower, t["history"], t["user_features"])
            warm_seconds = time.perf_counter() - started_warm
        else:
            model = make_model(kind, data, **(two_tower_kwargs if kind == "two_tower" else model_kwargs))
        info = fit(model, data, {"two_tower": cfg_two_tower, "sparcode_warm": cfg_warm}.get(kind, cfg), validate,
                   measure_start=warm)
        model.eval()
        tokenizer = model.tokenizer if kind == "two_tower" else model.encoder.tokenizer
        entry = {"dim": tokenizer.dim, "tokenizer_hidden": list(tokenizer.hidden), "epochs": info["epochs"],
                 "train_seconds": info["train_seconds"],
                 "best_valid_recall@20": info["best_valid_recall@20"], "valid_history": info["history"]}
        if warm:
            entry["warm_start_seconds"] = warm_seconds
        if kind in ("sparcode", "sparcode_warm"):
            codes = encode_users(model, data, cfg)  # shared by the headline index and the curve
            points = curve_points(args, data) if kind == curve_model else []
            rules = [headline_rule(args, data)] + [rule for _, _, rule in points]
            exports = export_all(model, item_features, data.n_items, rules, seed=args.seed, progress=not args.no_progress)
            index, export = exports.pop(0)
            if isinstance(index, Exception):
                raise index
            metrics = evaluate_engine(Engine(index, model.encoder), codes, data)
            entry.update(export_seconds=export["seconds"], export_rules_in_pass=export["rules_in_pass"],
                         density=export["density"], index_bytes=export["index_bytes"], nnz=export["nnz"],
                         bias=export["bias"], rule="bias" if args.cap_density is None else "cap", cap=rules[0].cap,
                         target_density=args.density if args.cap_density is None else args.cap_density)
            del index
        elif kind == "all_to_all":
            metrics = evaluate_exact(model, data, cfg, sample=args.all_to_all_sample, seed=args.seed)
            entry["sample_users"] = metrics["sample_users"]
        else:
            metrics = evaluate_exact(model, data, cfg)
        entry.update({k: metrics[k] for k in METRICS}, queries_per_s=metrics["queries_per_s"])
        report["models"][kind] = entry
        print(f"[accuracy] {args.dataset} {kind}: {headline} {metrics[headline]:.4f} recall@20 {metrics['recall@20']:.4f} "
              f"({info['epochs']} epochs, {info['train_seconds']:.0f} s)", flush=True)
        write(args.out, report, started)  # after every model: an interrupted run keeps what finished
        if kind == curve_model and exports:
            sparsity_curve(exports, points, model, data, codes, report, args.out, started)
        if kind == "two_tower":
            two_tower = model
        del model
    return report


def graph_filter_entry(args: argparse.Namespace, data, headline: str) -> tuple[dict, CodeIndex]:
    """Graph-filter codes (``training/graph_filter.py``): every ``--graph-filter-grid``
    setting fitted and scored on validation (``--graph-filter-split``), with the headline rule's items per
    code when ``--cap-density`` is given, else with each of ``--graph-filter-caps`` or
    ``screened_caps`` (as ``sparcode item-codes`` does by default); the best by the
    headline metric, refitted on the training split after a wide or tail screen, read on the test
    split once. Also returns the index."""
    caps = ([headline_rule(args, data).cap] if not args.screen_caps
            else sorted(set(args.graph_filter_caps or screened_caps(data.n_items))))
    index, best, grid = fit_on_validation(data, caps, args.graph_filter_grid, keeps=args.graph_filter_keeps,
                                          metric=headline, seed=args.seed, split=args.graph_filter_split,
                                          folds=args.graph_filter_folds)
    cap = best["cap"]
    for point in grid:
        print(f"[accuracy] graph_filter {point}", flush=True)
    metrics = evaluate_engine(Engine(index), history_bags(data.train), data)
    return {"train_seconds": best["fit_seconds"], "alpha": best["alpha"], "vectors": best["vectors"],
            "ease_weight": best["ease_weight"], "split": best["split"], "folds": best["folds"],
            "grid": grid, "selected_on": f"valid_{headline}", "rule": "cap", "cap": cap, "keep": best["keep"],
            "caps_screened": caps, "target_density": None if args.screen_caps else args.cap_density,
            "density": metrics["density"], "index_bytes": metrics["index_bytes"],
            "nnz": index.nnz, **{k: metrics[k] for k in METRICS}, "queries_per_s": metrics["queries_per_s"]}, index


def graph_filter_tower_entry(args: argparse.Namespace, data, headline: str, graph_filter: CodeIndex, chosen: dict,
                             two_tower, cfg: TrainConfig) -> dict:
    """Graph-filter codes and this run's TwoTower as tower codes (``training/tower_codes.py``)
    in one index (``joined_entry``)."""
    started = time.perf_counter()
    added = tower_family(two_tower, data, cfg, joined_caps(args, chosen), levels=args.tower_levels, size=args.tower_size,
                         seed=args.seed)
    entry = joined_entry(args, data, headline, graph_filter, chosen, added, "graph_filter_tower", started)
    entry.update(levels=args.tower_levels, size=min(args.tower_size, data.n_users))
    return entry


def graph_filter_features_entry(args: argparse.Namespace, data, headline: str, graph_filter: CodeIndex,
                                chosen: dict) -> dict:
    """Graph-filter codes and the users' feature codes (``training/feature_codes.py``) in
    one index (``joined_entry``)."""
    started = time.perf_counter()
    added = feature_family(data, joined_caps(args, chosen))
    return joined_entry(args, data, headline, graph_filter, chosen, added, "graph_filter_features", started)


def joined_caps(args: argparse.Namespace, chosen: dict) -> list[int]:
    """The added family's caps screened: the graph filter's."""
    return chosen["caps_screened"] if args.screen_caps else [chosen["cap"]]


def joined_entry(args: argparse.Namespace, data, headline: str, graph_filter: CodeIndex, chosen: dict, added: dict,
                 kind: str, started: float) -> dict:
    """Graph-filter codes and an ``added`` family in one index, every user's bag holding
    both (``training/ensemble.py``): the added family's cap, the graph-filter codes' power
    and the added codes' relative weight chosen on the validation split, the best read on
    test once (the graph filter alone where weight 0 wins)."""
    bags = history_bags(data.train)
    index, _, joined, best = join_family(data, graph_filter, bags, bags, added, powers=args.ensemble_powers,
                                         weights=args.ensemble_weights, metric=headline, seed=args.seed)
    seconds = time.perf_counter() - started
    grid = best.pop("grid")
    for point in grid:
        print(f"[accuracy] {kind} {point}", flush=True)
    metrics = evaluate_engine(Engine(index), joined, data)
    return {"train_seconds": chosen["train_seconds"] + seconds, "added_seconds": seconds, "graph_filter_cap": chosen["cap"],
            "added_cap": best["added"], "power": best["power"], "weight": best["weight"], "scale": best["scale"],
            "grid": grid, "selected_on": f"valid_{headline}", "rule": "cap",
            "density": metrics["density"], "index_bytes": metrics["index_bytes"], "nnz": index.nnz,
            **{k: metrics[k] for k in METRICS}, "queries_per_s": metrics["queries_per_s"]}


def item_codes_entry(args: argparse.Namespace, data, device: str) -> dict:
    """Item codes fitted in closed form on ``device``, indexed by the headline rule (each
    code's top items) and by each ``--cap-densities`` fraction (their sparsity curve),
    and searched through ``Engine`` with every user's history as codes."""
    started = time.perf_counter()
    scores = item_scores(data.train, data.n_items, l2_scale=args.item_codes_l2, device=device)
    fit_seconds = time.perf_counter() - started
    rule = headline_rule(args, data)
    started = time.perf_counter()
    index = item_code_index(scores, rule.cap, keep=args.item_codes_keep)
    index_seconds = time.perf_counter() - started
    bags = history_bags(data.train)
    metrics = evaluate_engine(Engine(index), bags, data)
    curve = []
    for fraction in args.cap_densities:
        cap = ExportRule.top(fraction, data.n_items).cap
        m = evaluate_engine(Engine(item_code_index(scores, cap, keep=args.item_codes_keep)), bags, data)
        curve.append({"rule": "cap", "target_density": fraction, "cap": cap, "density": m["density"],
                      "index_bytes": m["index_bytes"], **{k: m[k] for k in ("recall@20", "ndcg@20", "recall@50")},
                      "queries_per_s": m["queries_per_s"]})
        print(f"[accuracy] item_codes density {fraction:g}: {curve[-1]}", flush=True)
    del scores
    return {"train_seconds": fit_seconds, "l2": ridge(data.train, data.n_items, args.item_codes_l2),
            "bag_length": {"mean": float(np.diff(bags[1]).mean()), "max": int(np.diff(bags[1]).max(initial=0))},
            "export_seconds": index_seconds,
            "density": metrics["density"], "index_bytes": metrics["index_bytes"], "nnz": index.nnz, "rule": "cap",
            "keep": args.item_codes_keep,
            "cap": rule.cap, "target_density": args.cap_density, **{k: metrics[k] for k in METRICS},
            "queries_per_s": metrics["queries_per_s"], **({"sparsity_curve": curve} if curve else {})}


def headline_rule(args: argparse.Namespace, data) -> ExportRule:
    """The rule of the headline index: ``--cap-density`` or ``--density``."""
    return ExportRule(args.density) if args.cap_density is None else ExportRule.top(args.cap_density, data.n_items)


def curve_points(args: argparse.Namespace, data) -> list[tuple[str, float, ExportRule]]:
    """The sparsity curve's (rule name, target density, rule): one bias for all codes
    (``--densities``) or each code's top items (``--cap-densities``: the training
    activation on the kept pairs, none dropped by the bias, so no code's list is empty)."""
    return ([("bias", d, ExportRule(d)) for d in args.densities]
            + [("cap", d, ExportRule.top(d, data.n_items)) for d in args.cap_densities])


def export_all(model, item_features, n_items: int, rules: list[ExportRule], *, seed: int,
               progress: bool) -> list[tuple]:
    """(index, report) per rule from one scoring pass; if the indexes do not fit together
    (out of memory), one pass per rule, and a rule that fails alone gets its exception in
    place of its index (its curve point records the error instead of ending the run)."""
    try:
        return export_indexes(model, item_features, n_items, rules, seed=seed, progress=progress)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if len(rules) == 1:
            raise
        print(f"[accuracy] one export pass for {len(rules)} rules failed ({type(exc).__name__}); one pass each",
              flush=True)
    out: list[tuple] = []
    for rule in rules:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            out.extend(export_indexes(model, item_features, n_items, [rule], seed=seed, progress=progress))
        except (RuntimeError, MemoryError) as exc:
            out.append((exc, None))
    return out


def sparsity_curve(exports: list[tuple], points: list[tuple[str, float, ExportRule]], model, data, codes,
                   report: dict, out: Path, started: float) -> list[dict]:
    """Each exported index of the curve searched through ``Engine`` and freed once measured.
    A point that fails (out of memory, say) is recorded with its error instead of ending
    the run."""
    curve: list[dict] = []
    for kind, target, rule in points:
        index, export = exports.pop(0)
        try:
            if isinstance(index, Exception):
                raise index
            m = evaluate_engine(Engine(index, model.encoder), codes, data)
            curve.append({"rule": kind, "target_density": target, "cap": rule.cap, "density": export["density"],
                          "index_bytes": export["index_bytes"], "bias": export["bias"], "export_seconds": export["seconds"],
                          **{k: m[k] for k in ("recall@20", "ndcg@20", "recall@50")}, "queries_per_s": m["queries_per_s"]})
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            curve.append({"rule": kind, "target_density": target, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            traceback.print_exc()  # the log says where it failed; the record keeps the message
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        del index
        print(f"[accuracy] {kind} density {target:g}: {curve[-1]}", flush=True)
        report["sparsity_curve"] = curve
        write(out, report, started)
    return curve


def write(out: Path, report: dict, started: float) -> None:
    report["wall_seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"accuracy-{report['dataset']}.json"
    atomic_write_text(file, json.dumps(report, indent=2) + "\n")


def table(report: dict) -> str:
    lines = [f"{report['dataset']} on {report['device']}",
             f"{'model':<22}{'Recall@20':>10}{'NDCG@20':>9}{'Recall@50':>10}{'NDCG@50':>9}  note"]
    for name, m in report["models"].items():
        note = f"{m['epochs']} epochs" if "epochs" in m else "closed form"
        if "density" in m:
            note += f", {m.get('rule', 'bias')} density {m['density']:.2%}, {m['index_bytes'] / 2**20:.0f} MB"
        if "sample_users" in m:
            note += f", {m['sample_users']} users sampled"
        lines.append(f"{name:<22}{m['recall@20']:>10.4f}{m['ndcg@20']:>9.4f}{m['recall@50']:>10.4f}{m['ndcg@50']:>9.4f}  {note}")
    for point in report.get("sparsity_curve", []):
        rule = point.get("rule", "bias")
        if "error" in point:
            lines.append(f"  {rule} density {point['target_density']:g}: {point['error']}")
            continue
        lines.append(f"  {rule} density {point['density']:.4%}: Recall@20 {point['recall@20']:.4f}, "
                     f"{point['index_bytes'] / 2**20:.1f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.dataset != "synthetic" and args.path is None:
        print(f"accuracy: --path: the {args.dataset} dataset directory is needed", file=sys.stderr)
        return 2
    report = run(args, argv)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
