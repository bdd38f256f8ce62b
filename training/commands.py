"""``sparcode train``, ``export`` and ``evaluate``: the training side of the command line.

Only argparse at import time: the ``sparcode`` parser imports this module, and the
serving commands must not load training code. Each command imports what it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import defaults


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data and --path (and an interactions file's columns and split), as every
    command that reads a dataset takes them."""
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "interactions", "ml-100k", "ml-1m", "bars"],
                        help="interactions: your own Parquet or CSV file of (user, item[, timestamp]) rows")
    parser.add_argument("--path", type=Path, default=None,
                        help="dataset directory for a real dataset; the file for --data interactions")
    parser.add_argument("--user-column", default="user_id", help="interactions: the user id column (any id type)")
    parser.add_argument("--item-column", default="item_id", help="interactions: the item id column (any id type)")
    parser.add_argument("--time-column", default=None,
                        help="interactions: a timestamp column (numbers, dates or ISO 8601 text), for --holdout-by latest")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="interactions: the fraction of each user's items held out to test (default 0: train on "
                             "everything, report no test metrics)")
    parser.add_argument("--holdout-by", default="random", choices=defaults.HOLDOUTS,
                        help="interactions: hold out random items or each user's latest")


def data_source(args: argparse.Namespace):
    """(Columns, Split) of the interactions file from ``add_data_arguments``' options."""
    from .interactions import Columns, Split

    return Columns(args.user_column, args.item_column, args.time_column), Split(args.holdout, args.holdout_by)


def add_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train SparCode, TwoTower or AllToAll and save a checkpoint")
    add_data_arguments(train)
    train.add_argument("--model", default="sparcode", choices=["sparcode", "two_tower", "all_to_all"])
    train.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    train.add_argument("--epochs", type=int, default=defaults.EPOCHS,
                       help="0 with --init-from: the warm start as it is, a two-tower converted without training")
    train.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE)
    train.add_argument("--lr", type=float, default=None,
                       help=f"learning rate (default: {defaults.TWO_TOWER_LR:g} for two_tower, {defaults.LR:g} otherwise)")
    train.add_argument("--negatives", type=int, default=defaults.NEGATIVES, help="negatives shared by each batch")
    train.add_argument("--sampling", default=None, choices=defaults.SAMPLINGS,
                       help="how negatives are drawn (default: popularity; in-batch for two_tower; uniform with --density)")
    train.add_argument("--warmup", type=int, default=0, help="sparcode: epochs without quantization first")
    train.add_argument("--init-from", type=Path, default=None, metavar="TWO_TOWER_CHECKPOINT",
                       help="sparcode, all_to_all: start from a trained two_tower's tokenizer and item embeddings "
                            "(same data and --dim), the codebooks from k-means over its tokens")
    train.add_argument("--density", type=float, default=None,
                       help="sparcode: train for an index of this density (the bias follows a score quantile)")
    train.add_argument("--commitment", type=float, default=defaults.COMMITMENT,
                       help="sparcode: weight of the quantizer's commitment loss")
    train.add_argument("--valid-users", type=int, default=defaults.VALID_USERS,
                       help="users whose validation Recall@20 drives early stopping")
    train.add_argument("--time-budget", type=float, default=None,
                       help=f"stop after the epoch that passes this many seconds (default: {defaults.CPU_TIME_BUDGET:,.0f} "
                            "on a CPU, none on a GPU; 0 for none)")
    train.add_argument("--l2", type=float, default=defaults.L2, help="weight of the squared norm of each batch's item vectors")
    train.add_argument("--patience", type=int, default=defaults.PATIENCE,
                       help="epochs without a better validation Recall@20 before stopping")
    train.add_argument("--tokens", type=int, default=defaults.TOKENS, help="T")
    train.add_argument("--codewords", type=int, default=None,
                       help=f"C per codebook (default: {defaults.GPU_CODEWORDS} on a GPU and with --epochs 0, "
                            f"{defaults.CPU_CODEWORDS} for training on a CPU)")
    train.add_argument("--quantizer", default=defaults.QUANTIZER, choices=["product", "residual"],
                       help="sparcode: residual (each stage quantizes what the one before left) or product (the "
                            "paper's: each stage quantizes a slice of the token)")
    train.add_argument("--per-token-codebooks", action=argparse.BooleanOptionalAction, default=defaults.PER_TOKEN,
                       help="sparcode: one quantizer per token position, V = T * C**2, or one shared, V = C**2")
    train.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=defaults.FEEDBACK,
                       help="sparcode, per-token codebooks only: each position also quantizes the error the "
                            "positions before it left, so that the errors cancel in the sum over tokens")
    train.add_argument("--dim", type=int, default=None,
                       help=f"token and item embedding size (default: {defaults.TWO_TOWER_DIM} for two_tower, "
                            f"{defaults.DIM} otherwise; with --init-from, the two-tower's)")
    train.add_argument("--hidden", type=int, nargs="+", default=None,
                       help=f"scorer MLP widths (default: {' '.join(map(str, defaults.GPU_HIDDEN))} on a GPU, "
                            f"{' '.join(map(str, defaults.CPU_HIDDEN))} on a CPU)")
    train.add_argument("--embedding-std", type=float, default=defaults.EMBEDDING_STD,
                       help="initial std of the embeddings")
    train.add_argument("--temperature", type=float, default=defaults.TEMPERATURE,
                       help="two_tower: scores are cosine similarities over this temperature")
    train.add_argument("--device", default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(run=cmd_train)

    export = sub.add_parser("export", help="score every (code, item) pair of a SparCode checkpoint into an index")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("--out", type=Path, required=True, help="index directory")
    export.add_argument("--density", type=float, default=None,
                        help="target fraction of non-zero scores, by one bias for all codes (default: the model's "
                             "own bias)")
    export.add_argument("--cap", type=int, default=None, help="keep at most this many items per code")
    export.add_argument("--cap-density", type=float, default=None,
                        help="each code keeps its top FRACTION x N items with the training activation (--density 1 "
                             "--cap FRACTION x N): at 1%% on Gowalla within 2.1%% of the unsparsified Recall@20, where "
                             "one bias lost 55-69%%")
    export.add_argument("--device", default=None)
    export.add_argument("--no-progress", action="store_true")
    export.set_defaults(run=cmd_export)

    items = sub.add_parser("item-codes", help="fit item codes (each history item a code) into an index, with every "
                                              "user's codes for recommend and the test metrics")
    add_data_arguments(items)
    items.add_argument("--out", type=Path, required=True,
                       help="output directory: OUT/index, every user's bag of codes (their history) in "
                            "OUT/queries.parquet (user_id, codes; for sparcode recommend) and the test metrics in "
                            "OUT/metrics.json")
    cap = items.add_mutually_exclusive_group()
    cap.add_argument("--cap-density", type=float, default=None,
                     help=f"each code keeps its top FRACTION x N items (default: {defaults.INDEX_DENSITY:g} x N, at most "
                          f"{defaults.ITEM_CODES_CAP} items; graph-filter: the best on validation of "
                          f"{', '.join(f'{f:g}' for f in defaults.GRAPH_FILTER_CAP_DENSITIES)} x N, at most "
                          f"{defaults.ITEM_CODES_CAP})")
    cap.add_argument("--cap", type=int, nargs="+", default=None, metavar="N",
                     help="each code keeps its top N items (an index of at most N x cap pairs at any catalogue size); "
                          "graph-filter: several N are screened on validation with the grid")
    items.add_argument("--scores", choices=("ease", "graph-filter"), default="ease",
                       help="the (code, item) scores: EASE's closed form, or a graph filter whose settings (and "
                            "keep rule) are chosen on the validation split from --graph-filter-grid")
    items.add_argument("--graph-filter-grid", nargs="+", default=list(defaults.GRAPH_FILTER_GRID),
                       metavar="ALPHA:VECTORS[:EASE]", help="graph-filter: the settings screened on validation")
    items.add_argument("--graph-filter-split", choices=defaults.GRAPH_FILTER_SPLITS, default=defaults.GRAPH_FILTER_SPLIT,
                       help="graph-filter: screen on the validation split, or on 10%% of every user's training items, at "
                            "random (wide) or the end of each list (tail: lists in time order; auto: tail where the "
                            "test split is by time); the chosen setting serves refitted on the training data")
    items.add_argument("--graph-filter-folds", type=int, choices=range(1, 11), default=defaults.GRAPH_FILTER_FOLDS,
                       metavar="1..10", help="graph-filter: disjoint 10%% slices a wide screen averages")
    items.add_argument("--fit", choices=("auto", "exact", "neighbours"), default="auto",
                       help="ease: the exact closed form (one dense matrix of the smaller of users and items), each "
                            "item's regression over its --neighbours nearest items (any catalogue: no N x N matrix), "
                            f"or exact when the smaller side is at most {defaults.ITEM_CODES_EXACT_SIDE:,}")
    items.add_argument("--neighbours", type=int, default=defaults.ITEM_CODES_NEIGHBOURS,
                       help="ease --fit neighbours: regressors per item")
    items.add_argument("--l2", type=float, default=defaults.ITEM_CODES_L2,
                       help="ease: l2 weight as a multiple of the mean item's training interactions")
    items.add_argument("--keep", choices=defaults.ITEM_CODES_KEEPS, default=defaults.ITEM_CODES_KEEP,
                       help="each code's largest scores by magnitude (negative ones demote their items) or its "
                            "highest positive ones")
    items.add_argument("--tower", type=Path, default=None, metavar="CHECKPOINT",
                       help="also serve this trained two_tower (sparcode train --model two_tower, same data) from the "
                            "index as tower codes: its user vectors by residual k-means, "
                            f"{defaults.TOWER_CODE_LEVELS} codes per user; each user's bag holds both kinds, their "
                            "weights (and the tower codes' cap) chosen on the validation split")
    items.add_argument("--features", action="store_true",
                       help="also serve the users' categorical features as feature codes (each value and each pair of "
                            "values a code listing its items' lift among the users holding it); each user's bag holds "
                            "both kinds, their weights (and the feature codes' cap) chosen on the validation split")
    items.add_argument("--user-features", type=Path, default=None, metavar="FILE",
                       help="--features with --data interactions: a Parquet or CSV file of the users' categorical "
                            "features, one row per user: the --user-column and one column per feature (values as text)")
    items.add_argument("--device", default=None)
    items.add_argument("--no-progress", action="store_true")
    items.add_argument("--shard-items", action="store_true",
                       help="--fit neighbours under torchrun: each rank solves a share of the items, rank 0 writes")
    items.add_argument("--seed", type=int, default=0)
    items.set_defaults(run=cmd_item_codes)

    evaluate = sub.add_parser("evaluate", help="Recall, NDCG, Precision, HitRate @10/20/50 by full ranking")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--index", type=Path, default=None, help="SparCode: the exported index to evaluate through")
    evaluate.add_argument("--sample", type=int, default=None, help="AllToAll: score this many seeded users")
    evaluate.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
    evaluate.add_argument("--device", default=None)
    evaluate.set_defaults(run=cmd_evaluate)


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import checkpoint_config, load_data, save_checkpoint
    from .train import TrainConfig, fit, make_model, tensors, validator

    if args.epochs == 0 and args.init_from is None:
        raise ValueError("--epochs: 0 trains nothing; it takes a two-tower to convert (--init-from)")
    device = _device(args.device)
    hidden = list(args.hidden or defaults.hidden(device))
    codewords = defaults.codewords(device, trains=args.epochs > 0) if args.codewords is None else args.codewords
    sampling = args.sampling or defaults.sampling(args.model, args.density)
    budget = defaults.time_budget(device) if args.time_budget is None else args.time_budget
    dim = defaults.dim(args.model) if args.dim is None else args.dim
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, negatives=args.negatives, sampling=sampling,
                      lr=defaults.lr(args.model) if args.lr is None else args.lr, seed=args.seed, device=device,
                      progress=not args.no_progress, l2=args.l2,
                      patience=args.patience, time_budget=budget or None, warmup=args.warmup, density=args.density,
                      commitment=args.commitment, valid_users=args.valid_users)  # budget 0: none
    for flag, value in (("--codewords", codewords), ("--tokens", args.tokens), ("--dim", dim),
                        *(("--hidden", width) for width in hidden)):
        if value < 1:
            raise ValueError(f"{flag}: expected a positive integer, got {value}")
    chosen = [f"{sampling} negatives"] if args.sampling is None else []
    if args.model != "two_tower" and args.hidden is None:
        chosen.append(f"scorer hidden {' '.join(map(str, hidden))}")
    if args.model != "two_tower" and args.codewords is None:
        chosen.append(f"{codewords} codewords")
    if args.time_budget is None and cfg.time_budget is not None:
        chosen.append(f"time budget {cfg.time_budget:,.0f} s")
    if chosen:
        print(f"train: {', '.join(chosen)} (the defaults for {args.model} on {device}; --sampling, --hidden, "
              "--codewords and --time-budget override them)", file=sys.stderr)
    columns, split = data_source(args)
    data = load_data(args.data, args.path, args.seed, columns=columns, split=split)
    kwargs = ({"dim": dim, "n_tokens": args.tokens, "temperature": args.temperature,
               "embedding_std": args.embedding_std} if args.model == "two_tower"
              else {"dim": dim, "n_tokens": args.tokens, "n_words": codewords, "hidden": hidden,
                    "quantizer": args.quantizer, "per_token": args.per_token_codebooks,
                    "feedback": args.error_feedback, "embedding_std": args.embedding_std})
    source = None if args.init_from is None else two_tower_source(args.init_from, args.model, data, device)
    if source is not None:
        from .warm import model_kwargs, warm_start

        if args.dim is not None and args.dim != source.tokenizer.dim:
            raise ValueError(f"--dim: {args.dim}, but the two-tower in --init-from has dim {source.tokenizer.dim} "
                             "(a warm start takes the two-tower's; leave --dim out)")
        kwargs.update(model_kwargs(source))
    torch.manual_seed(args.seed)
    model = make_model(args.model, data, **kwargs)
    if source is not None:
        t = tensors(data, cfg)
        warm_start(model.to(device), source, t["history"], t["user_features"])
    info = fit(model, data, cfg, validator(data, cfg), measure_start=args.init_from is not None)
    if args.init_from is not None:
        info["init_from"] = str(args.init_from.resolve())
    save_checkpoint(args.out, model, checkpoint_config(args.model, kwargs, args.data, args.path, args.seed,
                                                       (2000, 800), cfg, info, columns, split))
    print(f"train: {args.model} on {data.name}: {info['epochs']} epochs, best validation Recall@20 "
          f"{info['best_valid_recall@20']:.4f}, {info['train_seconds']:.0f} s; checkpoint in {args.out}")
    return 0


def two_tower_source(checkpoint: Path, kind: str, data, device: str):
    """The trained TwoTower in ``checkpoint`` that a ``kind`` model on ``data`` starts from."""
    from .checkpoint import load_checkpoint
    from .models import TwoTower

    if kind == "two_tower":
        raise ValueError("--init-from: starts a sparcode or all_to_all model from a two_tower checkpoint")
    source, source_data, _ = load_checkpoint(checkpoint, device)
    if not isinstance(source, TwoTower):
        raise ValueError(f"--init-from: {checkpoint} holds a {type(source).__name__}, not a two_tower")
    if (source_data.name, source_data.n_users, source_data.n_items) != (data.name, data.n_users, data.n_items):
        raise ValueError(f"--init-from: {checkpoint} was trained on {source_data.name} ({source_data.n_users} users, "
                         f"{source_data.n_items} items), not on {data.name} ({data.n_users} users, {data.n_items} items)")
    return source


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .export import ExportRule, export_index
    from .models import SparCode
    from .train import TrainConfig, tensors

    if args.cap_density is not None:  # checked before the checkpoint and its data load
        if args.density is not None or args.cap is not None:
            raise ValueError("--cap-density: sets both the density and the cap; not with --density or --cap")
        if not 0 < args.cap_density <= 1:
            raise ValueError(f"--cap-density: expected a fraction in (0, 1], got {args.cap_density}")
    device = _device(args.device)
    model, data, _ = load_checkpoint(args.checkpoint, device)
    if not isinstance(model, SparCode) or not model.quantize:
        raise ValueError(f"{args.checkpoint}: only a SparCode checkpoint has codes to export")
    rule = (ExportRule(args.density, args.cap) if args.cap_density is None
            else ExportRule.top(args.cap_density, data.n_items))
    index, report = export_index(model, tensors(data, TrainConfig(device=device))["item_features"], data.n_items,
                                 density=rule.density, cap=rule.cap, progress=not args.no_progress)
    index.save(args.out, overwrite=True, encoder=model.encoder)
    print(f"export: {index.n_codes} codes x {index.n_items} items in {report['seconds']:.1f} s, "
          f"density {report['density']:.4%}, longest list {report['longest_list']:,}, "
          f"{report['index_bytes'] / 2**20:.1f} MB; index in {args.out}")
    return 0


def cmd_item_codes(args: argparse.Namespace) -> int:
    from .graph_filter import grid_point

    if args.cap is not None and min(args.cap) < 1:
        raise ValueError(f"--cap: expected positive numbers of items, got {min(args.cap)}")
    if args.cap is not None and len(args.cap) > 1 and args.scores != "graph-filter":
        raise ValueError("--cap: several caps are screened on validation with --scores graph-filter only; give one")
    if args.cap_density is not None and not 0 < args.cap_density <= 1:
        raise ValueError(f"--cap-density: expected a fraction in (0, 1], got {args.cap_density}")
    if not args.l2 > 0:
        raise ValueError(f"--l2: expected a positive number, got {args.l2}")
    if args.neighbours < 1:
        raise ValueError(f"--neighbours: expected a positive number of items, got {args.neighbours}")
    try:
        grid = [grid_point(text) for text in args.graph_filter_grid]
    except ValueError as exc:
        raise ValueError(f"--graph-filter-grid: {exc}") from None
    device = _device(args.device)
    if args.user_features is not None and (not args.features or args.data != "interactions"):
        raise ValueError("--user-features: the users' features of an interactions file, for --features with --data "
                         "interactions")
    if args.features and args.tower is not None:
        raise ValueError("--features: one added family per index; not with --tower")
    for flag, given in (("--tower", args.tower is not None), ("--features", args.features)):
        if given and args.shard_items:
            raise ValueError(f"{flag}: joins a second code family on one process; not with --shard-items")
    if args.shard_items:
        if args.fit != "neighbours" or args.scores != "ease":
            raise ValueError("--shard-items: shards the neighbour fit; add --fit neighbours")
        if "WORLD_SIZE" not in os.environ:
            raise ValueError("--shard-items: needs torchrun (WORLD_SIZE is not set)")
        import torch.distributed as dist

        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        try:
            return _item_codes(args, grid, device, write=dist.get_rank() == 0)
        finally:
            dist.destroy_process_group()
    return _item_codes(args, grid, device)


def _item_codes(args: argparse.Namespace, grid: list, device: str, write: bool = True) -> int:
    """Fit, evaluate and write item codes (``cmd_item_codes``); ``write=False`` (a rank
    other than 0) only fits its share."""
    import time

    from sparcode.engine import Engine
    from sparcode.engine.atomic import atomic_write_text

    from .checkpoint import load_data
    from .data import CSR
    from .evaluate import evaluate_engine, seen_items
    from .graph_filter import fit_on_validation, screened_caps
    from .interactions import with_user_features
    from .item_codes import ease_rows, history_bags, ridge, rows_index

    columns, split = data_source(args)
    data = load_data(args.data, args.path, args.seed, columns=columns, split=split)
    if args.user_features is not None:
        try:
            data = with_user_features(data, args.user_features, args.user_column)
        except ValueError as exc:
            raise ValueError(f"--user-features: {exc}") from None
    cap = code_cap(data.n_items, args.cap[0] if args.cap else None, args.cap_density)
    tested = data.test.items.size > 0
    known = CSR.from_lists(seen_items(data))  # every user's train and validation items: their served bag
    started = time.perf_counter()
    settings: dict = {"l2": ridge(data.train, data.n_items, args.l2), "keep": args.keep}
    if args.scores == "graph-filter":
        added_caps = (sorted(set(args.cap)) if args.cap else [cap] if args.cap_density is not None
                      else screened_caps(data.n_items))
        index, chosen, screened = fit_on_validation(data, added_caps, grid, keeps=defaults.GRAPH_FILTER_KEEPS,
                                                    seed=args.seed, split=args.graph_filter_split, folds=args.graph_filter_folds,
                                                    fit=data.train if tested else known)
        cap = chosen["cap"]
        settings = {"alpha": chosen["alpha"], "vectors": chosen["vectors"], "ease_weight": chosen["ease_weight"],
                    "keep": chosen["keep"], "split": chosen["split"], "folds": chosen["folds"], "grid": screened}
    else:  # without a test split nothing is measured, so the validation slice trains too (the graph filter's too)
        added_caps = [cap]
        fitted = data.train if tested else known
        fit = args.fit
        if fit == "auto":
            fit = "exact" if min(data.n_users, data.n_items) <= defaults.ITEM_CODES_EXACT_SIDE else "neighbours"
        settings["fit"] = fit
        if fit == "exact":
            index = rows_index(ease_rows(fitted, data.n_items, l2_scale=args.l2, device=device), data.n_items, cap,
                               keep=args.keep)
        else:
            settings["neighbours"] = args.neighbours
            index = neighbour_index(fitted, data.n_items, cap, args, device)
    served, evaluated = history_bags(known), history_bags(data.train)
    if args.tower is not None:
        index, served, evaluated, settings["tower"] = join_tower(args, data, index, served, evaluated, added_caps,
                                                                 device)
    if args.features:
        index, served, evaluated, settings["features"] = join_features(args, data, index, served, evaluated, added_caps)
    fit_seconds = time.perf_counter() - started
    if not write:
        return 0
    metrics = evaluate_engine(Engine(index), evaluated, data) if tested else None
    args.out.mkdir(parents=True, exist_ok=True)
    outputs = save_item_codes(args.out, index, data, known, served)
    lengths = known.lengths
    report = {"dataset": data.name, "model": "item_codes", "scores": args.scores, "device": device,
              "fit_seconds": fit_seconds, "cap": cap, **settings,
              "bag_length": {"mean": float(lengths.mean()), "max": int(lengths.max(initial=0))}, "metrics": metrics}
    atomic_write_text(args.out / "metrics.json", json.dumps(report, indent=2) + "\n")
    result = (f"test Recall@20 {metrics['recall@20']:.4f}, NDCG@20 {metrics['ndcg@20']:.4f}, Recall@50 "
              f"{metrics['recall@50']:.4f}" if tested else "no test split (--holdout holds some items out to measure)")
    print(f"item-codes: {index.n_codes:,} codes x {index.n_items:,} items, fit {fit_seconds:.1f} s, density "
          f"{index.nnz / (index.n_codes * index.n_items):.4%}, {index.nbytes / 2**20:.1f} MB; {result}; "
          f"{', '.join(outputs)} and metrics.json in {args.out}")
    text_ids = f" --item-ids {args.out / 'item_ids.parquet'}" if "item_ids.parquet" in outputs else ""
    print(f"item-codes: recommendations: sparcode recommend {args.out / 'index'} --queries {args.out / 'queries.parquet'} "
          f"--exclude {args.out / 'seen.parquet'}{text_ids} --k 100 --out RESULTS", file=sys.stderr)
    return 0


def join_tower(args: argparse.Namespace, data, index, served: tuple, evaluated: tuple, caps: list[int], device: str
               ) -> tuple:
    """Item codes and the ``--tower`` checkpoint's tower codes in one index (``ensemble.join_family``)."""
    from .checkpoint import load_checkpoint
    from .ensemble import join_family
    from .models import TwoTower
    from .tower_codes import tower_family
    from .train import TrainConfig

    if data.valid.items.size == 0:
        raise ValueError("--tower: needs validation items to choose the two kinds' weights")
    try:
        model, source, config = load_checkpoint(args.tower, device)
    except ValueError as exc:
        raise ValueError(f"--tower: {exc}") from None
    if not isinstance(model, TwoTower):
        raise ValueError(f"--tower: {args.tower} holds a {type(model).__name__}, not a two_tower")
    if (source.name, source.n_users, source.n_items) != (data.name, data.n_users, data.n_items):
        raise ValueError(f"--tower: {args.tower} was trained on {source.name} ({source.n_users} users, {source.n_items} "
                         f"items), not on {data.name} ({data.n_users} users, {data.n_items} items)")
    cfg = TrainConfig(device=device, history=config["train"]["history"], seed=config["train"]["seed"])
    added = tower_family(model, data, cfg, caps, seed=args.seed)
    index, served, evaluated, setting = join_family(data, index, served, evaluated, added, seed=args.seed)
    return index, served, evaluated, {**setting, "levels": defaults.TOWER_CODE_LEVELS}


def join_features(args: argparse.Namespace, data, index, served: tuple, evaluated: tuple, caps: list[int]) -> tuple:
    """Item codes and the users' feature codes (``feature_codes.py``) in one index (``ensemble.join_family``)."""
    from .ensemble import join_family
    from .feature_codes import feature_family

    if data.user_features is None:
        raise ValueError(f"--features: {data.name} has no user features (ml-1m, ml-100k and synthetic have; an "
                         "interactions file takes them from --user-features)")
    if data.valid.items.size == 0:
        raise ValueError("--features: needs validation items to choose the two kinds' weights")
    return join_family(data, index, served, evaluated, feature_family(data, caps), seed=args.seed)


def code_cap(n_items: int, cap: int | None = None, density: float | None = None) -> int:
    """Items per code for item-codes: ``cap``, or ``density`` x N, or by default
    ``defaults.INDEX_DENSITY`` x N up to ``defaults.ITEM_CODES_CAP`` (so that the index
    grows as N, not N^2)."""
    from .export import ExportRule

    if cap is not None:
        return cap
    if density is not None:
        return ExportRule.top(density, n_items).cap
    return min(ExportRule.top(defaults.INDEX_DENSITY, n_items).cap, defaults.ITEM_CODES_CAP)


def neighbour_index(train, n_items: int, cap: int, args: argparse.Namespace, device: str):
    """Item codes by the neighbour fit, with a progress bar per stage on stderr."""
    from tqdm import tqdm

    try:
        from .neighbour_fit import columns_index, gather_columns, neighbour_columns
    except ModuleNotFoundError as exc:
        raise ValueError(f"--fit neighbours: needs {exc.name} (pip install 'sparcode[cpu]')") from None

    bars: dict = {}

    def progress(stage: str, done: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=n_items, unit="item", unit_scale=True, desc=f"item-codes {stage}",
                               disable=args.no_progress)
        bars[stage].update(done)

    shard = (0, 1)
    if args.shard_items:
        import torch.distributed as dist

        shard = dist.get_rank(), dist.get_world_size()
    ids, weights = neighbour_columns(train, n_items, neighbours=args.neighbours, l2_scale=args.l2, device=device,
                                     shard=shard, progress=progress)
    for bar in bars.values():
        bar.close()
    if args.shard_items:
        weights = gather_columns(weights)
    return columns_index(ids, weights, n_items, cap, keep=args.keep)


def save_item_codes(out: Path, index, data, known, served: tuple) -> list[str]:
    """Write OUT/index, every user's bag of codes (OUT/queries.parquet: ``served``, flat
    codes, offsets and optional weights: their ``known`` items, train and validation, and
    any tower codes) and the ``known`` items to leave out of their recommendations
    (OUT/seen.parquet, ``user_id``, ``item_ids``), in the data's own ids: integer item
    ids go into the index, text ones into OUT/item_ids.parquet (row i names item i, for
    ``sparcode recommend --item-ids``). Returns the names written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparcode.engine import CodeIndex
    from sparcode.engine.atomic import atomic_write
    from sparcode.engine.queries import id_array, write_bags, write_item_ids

    from .item_codes import history_bags

    written = ["index", "queries.parquet", "seen.parquet"]
    ids = data.item_ids
    if ids is not None and ids.dtype.kind in "iu":
        index = CodeIndex.from_postings(index.indptr, index.items, index.scores, index.n_items,
                                        item_ids=np.asarray(ids, dtype=np.int64))
    elif ids is not None:
        write_item_ids(out / "item_ids.parquet", ids)
        written.append("item_ids.parquet")
    index.save(out / "index", overwrite=True)
    users = data.user_ids if data.user_ids is not None else np.arange(data.n_users)
    write_bags(out / "queries.parquet", users, *served)
    codes, offsets = history_bags(known)
    seen = pa.table({"user_id": id_array(users), "item_ids": pa.LargeListArray.from_arrays(
        pa.array(offsets), id_array(codes if ids is None else ids[codes]))})
    atomic_write(out / "seen.parquet", lambda tmp: pq.write_table(seen, tmp))
    return written


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .evaluate import evaluate_exact, evaluate_index
    from .models import SparCode
    from .train import TrainConfig

    device = _device(args.device)
    model, data, config = load_checkpoint(args.checkpoint, device)
    cfg = TrainConfig(device=device, seed=config["data"]["seed"])
    if isinstance(model, SparCode) and model.quantize:
        if args.index is None:
            raise ValueError("--index: a SparCode checkpoint is evaluated through its exported index")
        metrics = evaluate_index(model, data, args.index, cfg)
    else:
        metrics = evaluate_exact(model, data, cfg, sample=args.sample, seed=config["data"]["seed"])
    report = {"dataset": data.name, "model": config["model"]["kind"], "device": device, "metrics": metrics}
    text = json.dumps(report, indent=2)
    if args.out:
        from sparcode.engine.atomic import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0
