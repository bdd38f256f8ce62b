"""The ``sparcode`` command line. Bad arguments and unreadable files exit with code 2
and a one-line message, never a traceback."""

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
                        help=".npy of integer codes (B, T), or Parquet with a 'codes' list column (and optionally 'user_id')")
    search.add_argument("--k", type=int, default=100)
    search.add_argument("--out", type=Path, required=True, help="Parquet file to write (user_id, item_ids, scores)")
    search.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    search.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    search.set_defaults(run=cmd_search)

    bench = sub.add_parser("bench", help="benchmark SparCode against two-tower, faiss and all-to-all scoring")
    _add_bench_arguments(bench)
    bench.set_defaults(run=cmd_bench)
    return parser


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from sparcode.bench.harness import build_parser  # the benchmark suite lives apart from serving

    build_parser(parser)


def cmd_bench(args: argparse.Namespace) -> None:
    from sparcode.bench.harness import run

    run(args)


def cmd_info(args: argparse.Namespace) -> None:
    from .index import CodeIndex
    from .storage import read_manifest

    index = CodeIndex.load(args.path)
    print(json.dumps({"manifest": read_manifest(args.path), "stats": index.stats()}, indent=2))


def cmd_search(args: argparse.Namespace) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .engine import Engine

    if args.k < 1:
        raise UsageError(f"--k: expected an integer >= 1, got {args.k}")
    user_ids, codes = read_codes(args.codes)
    engine = Engine.load(args.path, device=args.device, backend=args.backend)
    scores, ids = engine.search(codes, k=args.k)
    table = pa.table({
        "user_id": pa.array(user_ids, type=pa.int64()),
        "item_ids": _list_column(ids, pa.int64()),
        "scores": _list_column(scores, pa.float32()),
    })
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {len(user_ids)} queries x k={args.k} to {args.out}")


def read_codes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, codes (B, T) int64) from .npy (user id = row) or Parquet."""
    if not path.is_file():
        raise UsageError(f"--codes: {path} is not a file")
    if path.suffix == ".npy":
        try:
            codes = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise UsageError(f"--codes: {path}: {exc}") from None
        return np.arange(codes.shape[0] if codes.ndim else 0), codes
    if path.suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UsageError(f"--codes: {path}: {exc}") from None
        if "codes" not in table.column_names:
            raise UsageError(f"--codes: {path} has no 'codes' column (columns: {table.column_names})")
        column = table.column("codes").combine_chunks()
        if not pa.types.is_list(column.type) and not pa.types.is_fixed_size_list(column.type):
            raise UsageError(f"--codes: column 'codes' must be a list of integers, got {column.type}")
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            raise UsageError("--codes: every row of 'codes' must have the same number of codes T")
        flat = column.flatten().to_numpy(zero_copy_only=False)
        codes = flat.reshape(len(column), int(lengths[0]) if len(lengths) else 0)
        users = table.column("user_id").to_numpy() if "user_id" in table.column_names else np.arange(len(column))
        return users, codes
    raise UsageError(f"--codes: expected a .npy or .parquet file, got {path.name}")


def _list_column(values: np.ndarray, value_type):
    import pyarrow as pa

    rows, k = values.shape
    offsets = pa.array(np.arange(0, (rows + 1) * k, k, dtype=np.int32) if rows else np.zeros(1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=value_type))


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except UsageError as exc:
        print(f"sparcode: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as exc:
        print(f"sparcode: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
