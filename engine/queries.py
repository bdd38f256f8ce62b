"""Query files for the offline job: row ranges of bags of codes (and user ids) read on demand.

``.npy``: a (rows, T) integer array, memory-mapped; the user id is the row number.
Parquet: a ``codes`` list column (bags of any length, empty ones too), an optional
``weights`` list column (one float per code) and an optional ``user_id`` column of
integer or text ids (else the row number); rows are read by range through the row-group
index, so a resumed or sharded run reads only its own parts. Text item ids live in an
item-ids file (``write_item_ids``): row i names item i of an index without ids of its own.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .atomic import atomic_write


class QueryRows(NamedTuple):
    """Rows of a query file as bags: row r's codes are ``codes[offsets[r]:offsets[r+1]]``."""

    users: np.ndarray  # (rows,) int64, or object (str) for text user ids
    codes: np.ndarray  # (codes,) int64
    offsets: np.ndarray  # (rows + 1,) int64
    weights: np.ndarray | None  # (codes,) float32
    width: int | None = None  # T of a dense (.npy) file, whose bags all have T codes

    def batch(self) -> dict[str, np.ndarray | None]:
        """``Engine.search`` arguments: (B, T) codes for a dense file, else flat codes,
        offsets and weights."""
        if self.width is not None:
            return {"batch": self.codes.reshape(-1, self.width)}
        return {"batch": self.codes, "offsets": self.offsets, "weights": self.weights}


class QueryFile:
    """Random access to rows [start, stop) of a query file as :class:`QueryRows`.
    ``name`` is the option the file came from, for error messages."""

    def __init__(self, path: Path, name: str = "--queries") -> None:
        self.name = name
        if not path.is_file():
            raise ValueError(f"{name}: {path} is not a file")
        self.path = path
        if path.suffix == ".npy":
            try:
                self._codes = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise ValueError(f"{name}: {path}: {exc}") from None
            if self._codes.ndim != 2 or not np.issubdtype(self._codes.dtype, np.integer):
                raise ValueError(f"{name}: {path} must hold a 2-d integer array of codes, got "
                                 f"{self._codes.dtype} {self._codes.shape}")
            self.rows = self._codes.shape[0]
            self._parquet = None
        elif path.suffix in (".parquet", ".pq"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                self._parquet = pq.ParquetFile(path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise ValueError(f"{name}: {path}: {exc}") from None
            names = self._parquet.schema_arrow.names
            if "codes" not in names:
                raise ValueError(f"{name}: {path} needs a 'codes' list column; raw feature columns need an "
                                 f"index with a query encoder, which this version does not have (columns: {names})")
            self._columns = [c for c in ("user_id", "codes", "weights") if c in names]
            meta = self._parquet.metadata
            self._group_starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
            self.rows = int(self._group_starts[-1])
        else:
            raise ValueError(f"{name}: expected a .npy or .parquet file, got {path.name}")

    def read(self, start: int, stop: int) -> QueryRows:
        """Rows [start, stop) as bags."""
        if self._parquet is None:
            codes = np.array(self._codes[start:stop], dtype=np.int64)
            offsets = np.arange(codes.shape[0] + 1, dtype=np.int64) * codes.shape[1]
            return QueryRows(np.arange(start, stop, dtype=np.int64), codes.reshape(-1), offsets, None, codes.shape[1])
        first = bisect.bisect_right(self._group_starts, start) - 1
        last = bisect.bisect_left(self._group_starts, stop)
        table = self._parquet.read_row_groups(list(range(first, last)), columns=self._columns)
        table = table.slice(start - int(self._group_starts[first]), stop - start)
        codes, offsets = self._lists(table, "codes", start)
        weights = None
        if "weights" in self._columns:
            weights, w_offsets = self._lists(table, "weights", start)
            if not np.array_equal(w_offsets, offsets):
                row = start + int(np.nonzero(np.diff(w_offsets) != np.diff(offsets))[0][0])
                raise ValueError(f"{self.name}: {self.path}: row {row}: 'weights' must hold one weight per code")
            weights = weights.astype(np.float32)
        users = (ids_of(table.column("user_id"), f"{self.name}: {self.path}: 'user_id'") if "user_id" in self._columns
                 else np.arange(start, stop, dtype=np.int64))
        return QueryRows(users, codes.astype(np.int64), offsets, weights)

    def _lists(self, table, column: str, start: int) -> tuple[np.ndarray, np.ndarray]:
        """A list column as (flat values, offsets from 0); nulls are not allowed."""
        import pyarrow as pa

        values = table.column(column).combine_chunks()
        if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)
                or pa.types.is_fixed_size_list(values.type)):
            raise ValueError(f"{self.name}: {self.path}: column '{column}' must be a list, got {values.type}")
        if values.null_count:
            row = start + int(np.nonzero(values.is_null().to_numpy(zero_copy_only=False))[0][0])
            raise ValueError(f"{self.name}: {self.path}: row {row}: '{column}' is null (an empty list is an empty bag)")
        lengths = values.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = values.flatten()
        if flat.null_count:
            raise ValueError(f"{self.name}: {self.path}: column '{column}' holds a null value")
        flat = flat.to_numpy(zero_copy_only=False)
        if flat.dtype.kind not in ("fiu" if column == "weights" else "iu"):
            raise ValueError(f"{self.name}: {self.path}: column '{column}' must hold "
                             f"{'numbers' if column == 'weights' else 'integers'}, got {flat.dtype}")
        return flat, offsets


def write_bags(path: Path, users: np.ndarray, codes: np.ndarray, offsets: np.ndarray,
               weights: np.ndarray | None = None, row_group: int = 65_536) -> None:
    """Write bags of codes as a query file QueryFile reads (``user_id``, ``codes`` list,
    optional ``weights`` list), atomically, in row groups of ``row_group`` users so that
    a job reads only its own parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    offsets = np.asarray(offsets, dtype=np.int64)
    columns = {"user_id": id_array(users),
               "codes": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(codes, dtype=np.int64)))}
    if weights is not None:
        columns["weights"] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(weights, np.float32)))
    table = pa.table(columns)
    atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp, row_group_size=row_group))


def ids_of(column, where: str) -> np.ndarray:
    """An arrow id column as numpy: int64 for integer ids, object (str) for text ones."""
    import pyarrow as pa

    if column.null_count:
        raise ValueError(f"{where}: holds a null id")
    if pa.types.is_integer(column.type):
        return column.to_numpy().astype(np.int64)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.to_numpy(zero_copy_only=False).astype(object)
    raise ValueError(f"{where}: ids must be integers or text, got {column.type}")


def id_array(ids: np.ndarray):
    """Ids (integer, or text as str) as an arrow array: int64 or string; None is null."""
    import pyarrow as pa

    ids = np.asarray(ids)
    return pa.array(ids, type=pa.int64()) if ids.dtype.kind in "iu" else pa.array(ids.astype(object), type=pa.string())


def write_item_ids(path: Path, item_ids: np.ndarray) -> None:
    """An item-ids file: one ``item_id`` column, row i the id of item i; atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"item_id": id_array(item_ids)})
    atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))


def read_item_ids(path: Path, n_items: int, name: str = "--item-ids") -> np.ndarray:
    """The ids of an item-ids file (``write_item_ids``), checked: ``n_items`` rows, unique."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["item_id"])
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise ValueError(f"{name}: {path}: needs an 'item_id' column ({exc})") from None
    ids = ids_of(table.column("item_id").combine_chunks(), f"{name}: {path}: 'item_id'")
    if ids.size != n_items:
        raise ValueError(f"{name}: {path}: {ids.size} ids, but the index has {n_items} items")
    if np.unique(ids).size != ids.size:
        raise ValueError(f"{name}: {path}: item ids must be unique")
    return ids


class ItemIds:
    """Item ids of an item-ids file at the edges of a search: positions out, ids in."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    def names(self, items: np.ndarray) -> np.ndarray:
        """Item positions (-1 for padding) -> ids (None for padding), the same shape."""
        out = self.ids[np.maximum(items, 0)].astype(object)
        out[items < 0] = None
        return out

    def positions(self, lists: list[np.ndarray]) -> list[np.ndarray]:
        """Per-user lists of ids -> item positions, dropping unknown ids."""
        out = []
        for items in lists:
            items = np.asarray(items, dtype=self.ids.dtype)
            pos = np.searchsorted(self._sorted, items).clip(max=self._sorted.size - 1)
            out.append(self._order[pos[self._sorted[pos] == items]].astype(np.int64))
        return out


class ExcludeTable:
    """Per-user item lists to leave out (Parquet ``user_id``, ``item_ids`` list; integer
    or text ids), held as CSR sorted by user id for lookups by batch."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=["user_id", "item_ids"])
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            raise ValueError(f"--exclude: {path}: needs columns user_id and item_ids ({exc})") from None
        users = ids_of(table.column("user_id").combine_chunks(), f"--exclude: {path}: 'user_id'")
        lists = table.column("item_ids").combine_chunks()
        lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = ids_of(lists.flatten(), f"--exclude: {path}: 'item_ids'")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        order = np.argsort(users, kind="stable")
        if len(users) > 1 and (users[order][1:] == users[order][:-1]).any():
            raise ValueError(f"--exclude: {path}: user ids must be unique")
        self.users = users[order]
        self.text_items = flat.dtype == object  # text ids, which need an item-ids file to match items
        self._starts, self._stops = offsets[:-1][order], offsets[1:][order]
        self._items = flat

    def lists_for(self, users: np.ndarray) -> list[np.ndarray]:
        """The excluded items of each user (empty for users not in the table)."""
        if len(self.users) == 0:
            return [np.zeros(0, np.int64) for _ in users]
        if (users.dtype == object) != (self.users.dtype == object):
            raise ValueError("--exclude: its user ids and the queries' are of different types (text and integers)")
        pos = np.searchsorted(self.users, users)
        found = (pos < len(self.users)) & (self.users[np.minimum(pos, len(self.users) - 1)] == users)
        return [self._items[self._starts[p] : self._stops[p]] if ok else np.zeros(0, np.int64) for p, ok in zip(pos, found)]
