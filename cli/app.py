"""The ``sparcode`` parser and the serving commands. Bad arguments and unreadable files
exit with code 2 and a one-line message, never a traceback. Each command imports what it
runs, so ``sparcode info`` loads no training code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


class UsageError(Exception):
    """A problem with the user's arguments or files: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparcode", description="SparCode retrieval engine")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="print the manifest and statistics of an index directory")
    info.add_argument("path", type=Path)
    info.set_defaults(run=cmd_info)

    search = sub.add_parser("search", help="search an index with query codes from a file, results to Parquet")
    search.add_argument("path", type=Path, help="index directory")
    search.add_argument("--codes", type=Path, required=True,
                        help=".npy of integer codes (B, T), or Parquet with a 'codes' list column (bags of any length) and "
                             "optionally 'weights' (a list of one float per code) and 'user_id'")
    search.add_argument("--k", type=int, default=100)
    search.add_argument("--item-ids", type=Path, default=None,
                        help="Parquet 'item_id' column naming item i in row i: results in those ids")
    search.add_argument("--out", type=Path, required=True, help="Parquet file to write (user_id, item_ids, scores)")
    search.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    search.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "numba"])
    search.set_defaults(run=cmd_search)

    rec = sub.add_parser("recommend", help="top-k for every query of a file, to Parquet parts (resumable)")
    rec.add_argument("index", type=Path, help="index directory")
    rec.add_argument("--queries", type=Path, required=True,
                     help=".npy of (rows, T) codes (user id = row) or Parquet with a 'codes' list column (bags of any "
                          "length), optionally 'weights' (one float per code) and 'user_id' (else the row)")
    rec.add_argument("--k", type=int, required=True)
    rec.add_argument("--out", type=Path, required=True, help="output directory (parts, journals, manifest.json)")
    rec.add_argument("--exclude", type=Path, default=None, help="Parquet user_id, item_ids: items to leave out per user")
    rec.add_argument("--item-ids", type=Path, default=None,
                     help="Parquet 'item_id' column naming item i in row i (text ids, as sparcode item-codes writes "
                          "them), for an index without ids of its own: results and --exclude in those ids")
    rec.add_argument("--batch-size", type=int, default=8192, help="queries per part")
    rec.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    rec.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "numba"])
    group = rec.add_mutually_exclusive_group()
    group.add_argument("--shard-queries", action="store_true", help="under torchrun: each rank takes its own parts")
    group.add_argument("--shard-items", action="store_true", help="under torchrun: each rank holds a slice of the items")
    rec.add_argument("--compression", default="none", choices=["none", "snappy", "zstd", "lz4", "gzip"],
                     help="Parquet codec of the parts (default none: keeps the job search-bound)")
    rec.add_argument("--no-progress", action="store_true", help="no progress bar")
    rec.set_defaults(run=cmd_recommend)

    _add_training_commands(sub)

    demo = sub.add_parser("demo", help="the whole pipeline on synthetic data (or a dataset): train, export, recommend, evaluate")
    demo.add_argument("--data", default="synthetic", choices=["synthetic", "ml-100k", "ml-1m", "bars"])
    demo.add_argument("--path", type=Path, default=None, help="dataset directory for a real dataset")
    demo.add_argument("--size", default="default", choices=["tiny", "default"], help="synthetic data size and epochs")
    demo.add_argument("--out", type=Path, default=Path("sparcode-demo"), help="where outputs are written")
    demo.add_argument("--device", default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=cmd_demo)

    bench = sub.add_parser("bench", help="benchmark SparCode against two-tower, faiss and all-to-all scoring")
    _add_bench_arguments(bench)
    bench.set_defaults(run=cmd_bench)
    return parser


def cmd_recommend(args: argparse.Namespace) -> int:
    from sparcode.engine.recommend import run_job

    shard = "queries" if args.shard_queries else "items" if args.shard_items else None
    if shard is not None:
        _init_distributed(args.device)
    try:
        summary = run_job(args.index, args.queries, args.out, k=args.k, exclude_path=args.exclude,
                          batch_size=args.batch_size, device=args.device, backend=args.backend, shard=shard,
                          progress=not args.no_progress, compression=args.compression, item_ids_path=args.item_ids)
    finally:
        if shard is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    state = "stopped early; rerun the same command to resume" if summary.stopped else "complete"
    print(f"recommend: {summary.queries:,} queries in {summary.parts_written} parts "
          f"({summary.parts_skipped} of {summary.parts_total} already on record) in {summary.seconds:.1f} s "
          f"after {summary.setup_seconds:.1f} s of setup, {summary.queries_per_s:,.0f} queries/s; {state}; "
          f"output in {args.out}", file=sys.stderr)
    return 130 if summary.stopped else 0


def _init_distributed(device: str | None) -> None:
    import torch
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:
        raise UsageError("--shard-queries/--shard-items need torchrun (WORLD_SIZE is not set)")
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dist.init_process_group(backend="nccl" if cuda else "gloo")


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    """train / export / evaluate (their options only: each command imports what it runs)."""
    from sparcode.training.commands import add_commands

    add_commands(sub)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from sparcode.training.demo import format_table, run_demo  # training is imported only here

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = run_demo(args.out, data_name=args.data, path=args.path, size=args.size, seed=args.seed, device=device,
                    progress=not args.no_progress)
    print(format_table(rows, device))
    print(f"outputs: {args.out}/index (the index), {args.out}/recommendations (Parquet parts), {args.out}/demo.json")
    return 0


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from sparcode.bench.options import build_parser  # options only: the harness loads when bench runs

    build_parser(parser)


def cmd_bench(args: argparse.Namespace) -> int:
    from sparcode.bench.harness import run

    return run(args)


def cmd_info(args: argparse.Namespace) -> None:
    from sparcode.engine.index import CodeIndex
    from sparcode.engine.storage import read_manifest

    index = CodeIndex.load(args.path)
    print(json.dumps({"manifest": read_manifest(args.path), "stats": index.stats()}, indent=2))


def cmd_search(args: argparse.Namespace) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparcode.engine import Engine
    from sparcode.engine.atomic import atomic_write
    from sparcode.engine.queries import ItemIds, QueryFile, id_array, read_item_ids

    if args.k < 1:
        raise UsageError(f"--k: expected an integer >= 1, got {args.k}")
    try:
        queries = QueryFile(args.codes, "--codes")
        rows = queries.read(0, queries.rows)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    user_ids = rows.users
    engine = Engine.load(args.path, device=args.device, backend=args.backend)
    names = None
    if args.item_ids is not None:
        if engine.index.item_ids is not None:
            raise UsageError(f"--item-ids: the index {args.path} has item ids of its own")
        names = ItemIds(read_item_ids(args.item_ids, engine.index.n_items))
    scores, ids = (np.asarray(t) for t in engine.search(k=args.k, **rows.batch()))  # numpy in, numpy out
    table = pa.table({
        "user_id": id_array(user_ids),
        "item_ids": _list_column(ids if names is None else names.names(ids)),
        "scores": _list_column(scores),
    })
    atomic_write(args.out, lambda tmp: pq.write_table(table, tmp))
    print(f"wrote {len(user_ids)} queries x k={args.k} to {args.out}")


def _list_column(values: np.ndarray):
    """(rows, k) values as an arrow list column: float32 scores, int64 or text ids."""
    import pyarrow as pa

    from sparcode.engine.queries import id_array

    rows, k = values.shape
    offsets = pa.array(np.arange(0, (rows + 1) * k, k, dtype=np.int32) if rows else np.zeros(1, np.int32))
    flat = values.reshape(-1)
    return pa.ListArray.from_arrays(offsets, pa.array(flat, type=pa.float32()) if flat.dtype.kind == "f" else id_array(flat))


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        status = args.run(args)
    except UsageError as exc:
        print(f"sparcode: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as exc:
        print(f"sparcode: error: {exc}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
