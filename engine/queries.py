"""Query files for the offline job: row ranges of codes (and user ids) read on demand.

``.npy``: a (rows, T) integer array, memory-mapped; the user id is the row number.
Parquet: a ``user_id`` column and a ``codes`` list column; rows are read by range
through the row-group index, so a resumed or sharded run reads only its own parts.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np


class QueryFile:
    """Random access to rows [start, stop) of a query file as (user_ids, codes)."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise ValueError(f"--queries: {path} is not a file")
        self.path = path
        if path.suffix == ".npy":
            try:
                self._codes = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise ValueError(f"--queries: {path}: {exc}") from None
            if self._codes.ndim != 2 or not np.issubdtype(self._codes.dtype, np.integer):
                raise ValueError(f"--queries: {path} must hold a 2-d integer array of codes, got "
                                 f"{self._codes.dtype} {self._codes.shape}")
            self.rows = self._codes.shape[0]
            self._parquet = None
        elif path.suffix in (".parquet", ".pq"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                self._parquet = pq.ParquetFile(path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise ValueError(f"--queries: {path}: {exc}") from None
            names = self._parquet.schema_arrow.names
            if "user_id" not in names:
                raise ValueError(f"--queries: {path} needs a 'user_id' column (columns: {names})")
            if "codes" not in names:
                raise ValueError(f"--queries: {path} needs a 'codes' list column; raw feature columns need an "
                                 f"index with a query encoder, which this version does not have (columns: {names})")
            meta = self._parquet.metadata
            self._group_starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
            self.rows = int(self._group_starts[-1])
        else:
            raise ValueError(f"--queries: expected a .npy or .parquet file, got {path.name}")

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(user_ids int64, codes int64 (rows, T)) of rows [start, stop)."""
        if self._parquet is None:
            return np.arange(start, stop, dtype=np.int64), np.array(self._codes[start:stop], dtype=np.int64)
        import pyarrow as pa

        first = bisect.bisect_right(self._group_starts, start) - 1
        last = bisect.bisect_left(self._group_starts, stop)
        table = self._parquet.read_row_groups(list(range(first, last)), columns=["user_id", "codes"])
        table = table.slice(start - int(self._group_starts[first]), stop - start)
        codes = table.column("codes").combine_chunks()
        if not (pa.types.is_list(codes.type) or pa.types.is_large_list(codes.type) or pa.types.is_fixed_size_list(codes.type)):
            raise ValueError(f"--queries: column 'codes' must be a list of integers, got {codes.type}")
        lengths = codes.value_lengths().to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            raise ValueError(f"--queries: rows {start}..{stop}: every row of 'codes' must have the same length T")
        width = int(lengths[0]) if len(lengths) else 0
        flat = codes.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        users = table.column("user_id").to_numpy().astype(np.int64)
        return users, flat.reshape(len(users), width)


class ExcludeTable:
    """Per-user item lists to leave out (Parquet ``user_id``, ``item_ids`` list), held as
    CSR sorted by user id for lookups by batch."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=["user_id", "item_ids"])
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            raise ValueError(f"--exclude: {path}: needs columns user_id and item_ids ({exc})") from None
        users = table.column("user_id").to_numpy().astype(np.int64)
        lists = table.column("item_ids").combine_chunks()
        lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        order = np.argsort(users, kind="stable")
        if len(users) > 1 and (np.diff(users[order]) == 0).any():
            raise ValueError(f"--exclude: {path}: user ids must be unique")
        self.users = users[order]
        self._starts, self._stops = offsets[:-1][order], offsets[1:][order]
        self._items = flat

    def lists_for(self, users: np.ndarray) -> list[np.ndarray]:
        """The excluded items of each user (empty for users not in the table)."""
        if len(self.users) == 0:
            return [np.zeros(0, np.int64) for _ in users]
        pos = np.searchsorted(self.users, users)
        found = (pos < len(self.users)) & (self.users[np.minimum(pos, len(self.users) - 1)] == users)
        return [self._items[self._starts[p] : self._stops[p]] if ok else np.zeros(0, np.int64) for p, ok in zip(pos, found)]
