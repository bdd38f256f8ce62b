"""A user's own interactions file: Parquet or CSV rows of (user, item[, timestamp]) with ids
of any type, read into per-user item lists with dense ids and the original ids kept.

Duplicated (user, item) rows collapse into one (at the latest timestamp). Ids are
numbered in sorted order; integer ids stay integers (a CSV id that is not written as a
plain integer, such as ``007``, keeps the whole column as text). Without a holdout
every interaction trains and the test split is empty; ``holdout`` moves a fraction of
each user's items (at least one, never all) to test, at random or the latest by
timestamp. A bad row (missing column, empty id, unparsable timestamp, wrong field count)
raises a ``ValueError`` naming the file, the row (a CSV's line, a Parquet file's row
from 1) and the column.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .data import InteractionData, assemble
from .defaults import HOLDOUTS

SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class Columns:
    """The names of the user, item and (optional) timestamp columns."""

    user: str = "user_id"
    item: str = "item_id"
    time: str | None = None


@dataclass(frozen=True)
class Split:
    """How an interactions file becomes train and test: ``holdout`` of each user's items
    (a fraction; 0 trains on everything) chosen ``by`` "random" or "latest" timestamp."""

    holdout: float = 0.0
    by: str = "random"

    def __post_init__(self) -> None:
        if not 0 <= self.holdout < 1:
            raise ValueError(f"--holdout: expected a fraction in [0, 1), got {self.holdout}")
        if self.by not in HOLDOUTS:
            raise ValueError(f"--holdout-by: expected one of {', '.join(HOLDOUTS)}, got {self.by!r}")


@dataclass
class Interactions:
    """Deduplicated (user, item) pairs with dense ids: ``users``/``items`` index
    ``user_ids``/``item_ids`` (the file's ids, sorted); ``times`` float64 seconds or None."""

    users: np.ndarray
    items: np.ndarray
    times: np.ndarray | None
    user_ids: np.ndarray
    item_ids: np.ndarray


def read_interactions(path: Path | str, columns: Columns = Columns()) -> Interactions:
    """The interactions in ``path`` (``.csv``, ``.tsv``, ``.parquet`` or ``.pq``)."""
    path = Path(path)
    kind = _kind(path, "interactions")
    wanted = [c for c in (columns.user, columns.item, columns.time) if c is not None]
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"columns: the user, item and timestamp columns must differ, got {wanted}")
    table = _read_csv(path, wanted) if kind == "csv" else _read_parquet(path, wanted)
    where = _where(path, kind)
    ids = {}
    for name in (columns.user, columns.item):
        values = table.column(name).combine_chunks()
        ids[name] = _ids(values, kind == "csv", lambda row, name=name: f"{where(row)}: column '{name}'")
    times = None
    if columns.time is not None:
        times = _seconds(table.column(columns.time).combine_chunks(), lambda row: f"{where(row)}: column '{columns.time}'")
    (user_ids, users), (item_ids, items) = ids[columns.user], ids[columns.item]
    return _dedupe(users, items, times, user_ids, item_ids)


def load_interactions(path: Path | str, *, columns: Columns = Columns(), split: Split = Split(),
                      seed: int = 0) -> InteractionData:
    """``read_interactions`` as an :class:`InteractionData`: each user's items (in
    timestamp order when there is one) to train, ``split.holdout`` of them to test, and
    the seeded validation slice of train that every loader takes."""
    if split.by == "latest" and split.holdout and columns.time is None:
        raise ValueError("--holdout-by: 'latest' needs a timestamp column (--time-column)")
    holdout = split.holdout
    data = read_interactions(path, columns)
    n_users, n_items = len(data.user_ids), len(data.item_ids)
    rng = np.random.default_rng(seed)
    noise = rng.random(data.users.size)  # the random holdout's order, and the tie order of equal timestamps
    by = noise if split.by == "random" or data.times is None else data.times
    order = np.lexsort((noise, by, data.users))  # each user's rows, the held-out ones last
    users = data.users[order]
    lengths = np.bincount(users, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    n_test = np.where(lengths >= 2, np.clip(np.rint(holdout * lengths), 1 if holdout else 0, lengths - 1), 0)
    test = np.empty(users.size, dtype=bool)
    test[order] = np.arange(users.size) - starts[users] >= (lengths - n_test)[users]
    keep = np.lexsort((data.items, data.users)) if data.times is None else np.lexsort((data.items, data.times, data.users))
    train_lists = _lists(data.users[keep][~test[keep]], data.items[keep][~test[keep]], n_users)
    test_lists = _lists(data.users[keep][test[keep]], data.items[keep][test[keep]], n_users)
    timed = data.times is not None and (split.by == "latest" or not holdout)  # a holdout of 0 serves the future
    return assemble(Path(path).stem, n_users, n_items, train_lists, test_lists, seed,
                   user_ids=data.user_ids, item_ids=data.item_ids, test_by="time" if timed else "random")


def with_user_features(data: InteractionData, path: Path | str, user_column: str = "user_id") -> InteractionData:
    """``data`` with the users' categorical features from ``path`` (``.csv``, ``.tsv`` or
    ``.parquet``): one row per user, ``user_column`` and every other column a feature,
    its values read as text. Feature j's ids: 0 for a user absent from the file or with
    an empty value, 1 + the rank of the value among the file's otherwise. Rows of users
    with no interactions are ignored."""
    import pyarrow as pa
    import pyarrow.compute as pc

    path = Path(path)
    if data.user_ids is None:
        raise ValueError("data: user features join on the interactions' user ids, and this data has none")
    kind = _kind(path, "user features")
    names = _header(path) if kind == "csv" else _parquet_names(path)
    _check_columns(path, [user_column], names)
    columns = [c for c in names if c != user_column]
    if not columns:
        raise ValueError(f"{path}: no feature columns besides the user column {user_column!r}")
    table = _read_csv(path, names) if kind == "csv" else _read_parquet(path, names)
    where = _where(path, kind)
    file_ids, rows = _ids(table.column(user_column).combine_chunks(), kind == "csv",
                          lambda row: f"{where(row)}: column '{user_column}'")
    order = np.argsort(rows, kind="stable")
    repeats = order[1:][rows[order][1:] == rows[order][:-1]]  # the rows after each user's first
    if repeats.size:
        row = int(repeats.min())
        raise ValueError(f"{where(row)}: column '{user_column}': user {file_ids[rows[row]]!r} has a second row")
    same = file_ids.dtype.kind == data.user_ids.dtype.kind
    index = {(u if same else str(u)): i for i, u in enumerate(data.user_ids.tolist())}
    target = np.array([index.get(u if same else str(u), -1) for u in file_ids.tolist()], dtype=np.int64)[rows]
    held = target >= 0
    if not held.any():
        raise ValueError(f"{path}: none of its {file_ids.size} users is in the interactions (column '{user_column}')")
    features = np.zeros((data.n_users, len(columns)), dtype=np.int64)
    cards = []
    for j, name in enumerate(columns):
        text = pc.utf8_trim_whitespace(pc.cast(table.column(name).combine_chunks(), pa.string()))
        values = pc.fill_null(text, "").to_numpy(zero_copy_only=False).astype(str)
        labels = np.unique(values[values != ""])
        features[target[held], j] = np.where(values != "", np.searchsorted(labels, values) + 1, 0)[held]
        cards.append(labels.size + 1)
    return replace(data, user_features=features, user_cardinalities=tuple(cards))


def _kind(path: Path, what: str) -> str:
    """"csv" or "parquet" by ``path``'s suffix; an error naming the path otherwise."""
    if not path.is_file():
        raise ValueError(f"path: {path} is not a file")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"path: {path}: expected a .csv, .tsv or .parquet file of {what}")
    return kind


def _where(path: Path, kind: str):
    """Row number (from 0) -> where it is in the file: a CSV's line (its header is line 1), a Parquet file's row from 1."""
    if kind == "csv":
        return lambda row: f"{path}: line {row + 2}"
    return lambda row: f"{path}: row {row + 1}"


def _delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        return next(csv.reader(fh, delimiter=_delimiter(path)), [])


def _lists(users: np.ndarray, items: np.ndarray, n_users: int) -> list[np.ndarray]:
    """Per-user item lists of rows grouped by user (in their order)."""
    return np.split(items, np.cumsum(np.bincount(users, minlength=n_users))[:-1])


def _read_csv(path: Path, wanted: list[str]):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    bad = []

    def bad_row(row) -> str:  # pyarrow's own error omits the line: keep the row, stop reading
        bad.append(row)
        return "error"

    parse = pcsv.ParseOptions(delimiter=_delimiter(path), invalid_row_handler=bad_row)
    _check_columns(path, wanted, _header(path))
    try:
        return pcsv.read_csv(path, read_options=pcsv.ReadOptions(use_threads=False), parse_options=parse,
                             convert_options=pcsv.ConvertOptions(include_columns=wanted,
                                                                 column_types={c: pa.string() for c in wanted},
                                                                 strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as exc:
        if bad:
            raise ValueError(f"{path}: line {bad[0].number}: expected {bad[0].expected_columns} fields, got "
                             f"{bad[0].actual_columns} ({bad[0].text[:80]!r})") from None
        raise ValueError(f"{path}: {exc}") from None


def _read_parquet(path: Path, wanted: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_columns(path, wanted, _parquet_names(path))
    try:
        return pq.read_table(path, columns=wanted)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def _parquet_names(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).schema_arrow.names
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def _check_columns(path: Path, wanted: list[str], present: list[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(present)}); "
                         "name the columns with --user-column, --item-column and --time-column")


def _ids(values, from_text: bool, where) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct ids, sorted; each row's index into them) of an id column: integers
    stay integers, text stays text (CSV text that is all plain integers becomes integers)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if values.null_count:
        raise ValueError(f"{where(_first(values.is_null()))}: empty id")
    if pa.types.is_integer(values.type):
        ints = values.to_numpy().astype(np.int64)
        uniq, inverse = np.unique(ints, return_inverse=True)
        return uniq, inverse.astype(np.int64)
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ValueError(f"{where(0)}: ids must be integers or text, got {values.type}")
    values = pc.utf8_trim_whitespace(values)
    empty = pc.equal(pc.utf8_length(values), 0)
    if pc.any(empty).as_py():
        raise ValueError(f"{where(_first(empty))}: empty id")
    if from_text and pc.all(pc.match_substring_regex(values, r"^(0|-?[1-9][0-9]{0,17})$")).as_py():
        return _ids(pc.cast(values, pa.int64()), False, where)
    encoded = pc.dictionary_encode(values)
    labels = encoded.dictionary.to_numpy(zero_copy_only=False)
    order = np.argsort(labels, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return labels[order].astype(object), rank[encoded.indices.to_numpy()].astype(np.int64)


def _first(mask) -> int:
    """The first row where a boolean arrow array is true."""
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))[0])


def _seconds(values, where) -> np.ndarray:
    """A timestamp column as float64 seconds: numbers as they are, timestamps and dates,
    or text holding numbers or ISO 8601 date-times (without a zone: UTC)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if values.null_count:
        raise ValueError(f"{where(_first(values.is_null()))}: empty timestamp")
    if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        out = values.to_numpy().astype(np.float64)
    elif pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
        micros = pc.cast(pc.cast(values, pa.timestamp("us")), pa.int64())
        out = micros.to_numpy().astype(np.float64) / 1e6
    elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        values = pc.utf8_trim_whitespace(values)
        for target in (pa.float64(), pa.timestamp("us"), pa.timestamp("us", tz="UTC")):
            try:
                parsed = pc.cast(values, target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
            return _seconds(parsed, where)
        first = values[0].as_py() if len(values) else ""
        target = pa.float64() if _castable(values.slice(0, 1), pa.float64()) else next(
            (t for t in (pa.timestamp("us"), pa.timestamp("us", tz="UTC")) if _castable(values.slice(0, 1), t)), None)
        row = 0 if target is None else _first_failure(values, target)
        raise ValueError(f"{where(row)}: cannot read {values[row].as_py()!r} as a timestamp (a number, or an ISO 8601 "
                         f"date-time in the same format as the first row's {first!r})")
    else:
        raise ValueError(f"{where(0)}: timestamps must be numbers, dates or text, got {values.type}")
    bad = ~np.isfinite(out)
    if bad.any():
        raise ValueError(f"{where(int(np.flatnonzero(bad)[0]))}: timestamp {out[bad][0]} is not finite")
    return out


def _castable(values, target) -> bool:
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        pc.cast(values, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def _first_failure(values, target) -> int:
    """The first row of ``values`` that does not cast to ``target``, by halving (a few
    casts over the column, not a Python loop over its rows)."""
    lo, hi = 0, len(values)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _castable(values.slice(lo, mid - lo), target):
            lo = mid
        else:
            hi = mid
    return lo


def _dedupe(users: np.ndarray, items: np.ndarray, times: np.ndarray | None, user_ids: np.ndarray,
            item_ids: np.ndarray) -> Interactions:
    """One row per (user, item), at its latest timestamp."""
    order = np.lexsort((items, users)) if times is None else np.lexsort((times, items, users))
    users, items = users[order], items[order]
    last = np.ones(users.size, dtype=bool)
    last[:-1] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
    return Interactions(users[last], items[last], None if times is None else times[order][last], user_ids, item_ids)
