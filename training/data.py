"""Interaction data: per-user item lists (train / validation / test) as CSR, optional
categorical user and item features, and the original id maps.

Loaders: MovieLens-100K (split by time), MovieLens-1M (seeded random split), the
BARS/LightGCN text format (fixed split), and a synthetic generator whose ground truth
is a random (user segment x item category) affinity table, beyond what a 16-d dot
product can rank (a 64-d one still ranks it well; docs/accuracy.md). Validation is a
seeded slice of each user's training items. Malformed lines are rejected with the file
and line number.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


@dataclass
class CSR:
    indptr: np.ndarray  # (rows + 1) int64
    items: np.ndarray  # int64

    @classmethod
    def from_lists(cls, lists: list[np.ndarray]) -> CSR:
        lengths = np.array([len(x) for x in lists], dtype=np.int64)
        items = np.concatenate(lists).astype(np.int64) if lists and lengths.sum() else np.zeros(0, np.int64)
        return cls(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), items)

    def row(self, r: int) -> np.ndarray:
        return self.items[self.indptr[r] : self.indptr[r + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)


@dataclass
class InteractionData:
    name: str
    n_users: int
    n_items: int
    train: CSR
    valid: CSR
    test: CSR
    user_features: np.ndarray | None = None  # (U, F) int64 categorical ids
    user_cardinalities: tuple[int, ...] = ()
    item_features: np.ndarray | None = None  # (I, F) int64
    item_cardinalities: tuple[int, ...] = ()
    user_ids: np.ndarray | None = None  # original ids
    item_ids: np.ndarray | None = None
    test_by: str = "random"  # "time": test holds each user's latest items, train lists are in time order


def split_validation(train: list[np.ndarray], fraction: float, seed: int,
                     max_users: int = 2000, fold: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A seeded slice of the training items of at most ``max_users`` seeded users (with
    >= 5 items each) for validation. Early stopping needs no more users than that, and
    every other user keeps all of their training data (the BARS protocol trains on the
    whole training split). ``fold`` f takes the items whose seeded draw falls in
    [f x fraction, (f + 1) x fraction): the folds of one seed are disjoint."""
    if not 0 <= fold * fraction < 1:
        raise ValueError(f"fold: expected 0 <= fold x fraction < 1, got fold {fold} at fraction {fraction}")
    rng = np.random.default_rng(seed)
    eligible = np.array([u for u, items in enumerate(train) if len(items) >= 5], dtype=np.int64)
    chosen = np.zeros(len(train), dtype=bool)
    chosen[rng.choice(eligible, size=min(max_users, len(eligible)), replace=False)] = True
    kept, valid = [], []
    for user, items in enumerate(train):
        if chosen[user]:
            draw = rng.random(len(items))
            pick = (draw >= fold * fraction) & (draw < (fold + 1) * fraction)
            if pick.all():
                pick[0] = False
            kept.append(items[~pick])
            valid.append(items[pick])
        else:
            kept.append(items)
            valid.append(items[:0])
    return kept, valid


def screen_split(data: InteractionData, rule: str, fraction: float = 0.1, seed: int = 0,
                 fold: int = 0) -> InteractionData:
    """``data`` with a validation split for screening settings over every user with >= 5
    training items (not only the early-stopping users): ``rule="wide"`` holds out a
    seeded random ``fraction`` of each one's training items (``fold`` picks one of the
    disjoint slices of a seed, ``split_validation``), ``rule="tail"`` the last
    ``fraction`` of each list (at least one item), a later-in-time holdout where the lists
    are in time order (MovieLens-100K's, and the BARS files' as far as their order shows).
    Its train is the rest with the validation items: every item the user is known to have
    but the held ones, as a served model excludes them all (left out, they would take
    top-k slots as misses). A model screened on it is refitted on the whole training split
    before it serves (``graph_filter.fit_on_validation``)."""
    train = [data.train.row(u) for u in range(data.n_users)]
    if rule == "wide":
        kept, held = split_validation(train, fraction, seed, max_users=data.n_users, fold=fold)
    elif rule == "tail" and fold == 0:
        cuts = [len(items) - max(1, int(fraction * len(items) + 0.5)) if len(items) >= 5 else len(items)
                for items in train]
        kept, held = [items[:cut] for items, cut in zip(train, cuts)], [items[cut:] for items, cut in zip(train, cuts)]
    else:
        raise ValueError(f"rule: expected 'wide' or 'tail' (one fold), got {rule!r} at fold {fold}")
    known = [np.concatenate([items, data.valid.row(u)]) for u, items in enumerate(kept)]
    return replace(data, train=CSR.from_lists(known), valid=CSR.from_lists(held))


def assemble(name, n_users, n_items, train, test, seed, **extra) -> InteractionData:
    """The loaders' common end: per-user train and test lists, the validation slice of train."""
    train, valid = split_validation(train, 0.1, seed)
    return InteractionData(name, n_users, n_items, CSR.from_lists(train), CSR.from_lists(valid), CSR.from_lists(test), **extra)


def _ints(fields: list[str], file: Path, line_no: int) -> list[int]:
    try:
        return [int(f) for f in fields]
    except ValueError:
        raise ValueError(f"{file}:{line_no}: expected integers, got {' '.join(fields)[:80]!r}") from None


def _file(path: Path | str, name: str) -> Path:
    """``path / name``, which must exist (a str path is accepted, as from a notebook)."""
    file = Path(path) / name
    if not file.is_file():
        raise ValueError(f"path: {file} is missing")
    return file


def load_bars(path: Path | str, *, seed: int = 0) -> InteractionData:
    """BARS/LightGCN text format: ``train.txt`` and ``test.txt``, one line per user:
    ``user item item ...`` with dense 0-based ids (Gowalla). The split is NGCF's, which
    LightGCN and BARS reuse: each user's latest 20% to test; the train lines keep their
    time order (item popularity rises along them, docs/accuracy.md)."""
    lists: dict[str, dict[int, np.ndarray]] = {}
    for split in ("train", "test"):
        file = _file(path, f"{split}.txt")
        rows = {}
        for line_no, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            ids = _ints(line.split(), file, line_no)
            if ids[0] < 0 or any(i < 0 for i in ids):
                raise ValueError(f"{file}:{line_no}: negative id")
            rows[ids[0]] = np.array(ids[1:], dtype=np.int64)
        lists[split] = rows
    n_users = 1 + max(max(lists["train"]), max(lists["test"], default=0))
    n_items = 1 + max(int(v.max()) for rows in lists.values() for v in rows.values() if len(v))
    empty = np.zeros(0, np.int64)
    train = [lists["train"].get(u, empty) for u in range(n_users)]
    test = [lists["test"].get(u, empty) for u in range(n_users)]
    return assemble(Path(path).name, n_users, n_items, train, test, seed, test_by="time")


def _dense(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(original ids in order, dense index of each value)."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, inverse


def load_ml100k(path: Path | str, *, seed: int = 0) -> InteractionData:
    """MovieLens-100K: each user's last 20% of items by time go to test. User features:
    age bucket, gender, occupation; item features: first genre, release decade."""
    file = _file(path, "u.data")
    rows = []
    for line_no, line in enumerate(file.read_text(encoding="latin-1").splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(f"{file}:{line_no}: expected 4 tab-separated fields")
        rows.append(_ints(fields, file, line_no))
    data = np.array(rows, dtype=np.int64)
    user_ids, users = _dense(data[:, 0])
    item_ids, items = _dense(data[:, 1])
    order = np.lexsort((items, data[:, 3], users))
    train, test = [], []
    for u_items in np.split(items[order], np.cumsum(np.bincount(users, minlength=len(user_ids)))[:-1]):
        cut = len(u_items) - max(1, int(round(0.2 * len(u_items))))
        train.append(u_items[:cut])
        test.append(u_items[cut:])
    ufeat, ucard = _ml100k_users(_file(path, "u.user"), user_ids)
    ifeat, icard = _ml100k_items(_file(path, "u.item"), item_ids)
    return assemble("ml-100k", len(user_ids), len(item_ids), train, test, seed, user_features=ufeat,
                   user_cardinalities=ucard, item_features=ifeat, item_cardinalities=icard,
                   user_ids=user_ids, item_ids=item_ids, test_by="time")


def _categorical(columns: list[list[str]]) -> tuple[np.ndarray, tuple[int, ...]]:
    out, cards = [], []
    for col in columns:
        _, inverse = np.unique(np.array(col), return_inverse=True)
        out.append(inverse)
        cards.append(int(inverse.max()) + 1 if len(inverse) else 1)
    return np.stack(out, 1).astype(np.int64), tuple(cards)


def _ml100k_users(file: Path, user_ids: np.ndarray):
    table = {}
    for line_no, line in enumerate(file.read_text(encoding="latin-1").splitlines(), 1):
        f = line.split("|")
        if len(f) != 5:
            raise ValueError(f"{file}:{line_no}: expected 5 '|'-separated fields")
        table[_ints([f[0]], file, line_no)[0]] = (str(min(int(f[1]) // 10, 6)), f[2], f[3])
    return _categorical([[table[u][j] for u in user_ids] for j in range(3)])


def _ml100k_items(file: Path, item_ids: np.ndarray):
    table = {}
    for line_no, line in enumerate(file.read_text(encoding="latin-1").splitlines(), 1):
        f = line.split("|")
        if len(f) != 24:
            raise ValueError(f"{file}:{line_no}: expected 24 '|'-separated fields")
        flags = f[5:]
        genre = str(flags.index("1")) if "1" in flags else "none"
        year = f[2][-4:]
        table[_ints([f[0]], file, line_no)[0]] = (genre, year[:3] if year.isdigit() else "none")
    return _categorical([[table[i][j] for i in item_ids] for j in range(2)])


def load_ml1m(path: Path | str, *, seed: int = 0) -> InteractionData:
    """MovieLens-1M (``interactions.tsv`` with a header, no timestamps): a seeded random
    20% of each user's items to test. User features: gender, age, occupation; item
    features: first genre, year decade."""
    file = _file(path, "interactions.tsv")
    lines = file.read_text().splitlines()
    if not lines or lines[0].split("\t") != ["user_id", "movie_id"]:
        raise ValueError(f"{file}:1: expected the header 'user_id<TAB>movie_id'")
    pairs = np.array([_ints(line.split("\t"), file, n) for n, line in enumerate(lines[1:], 2)], dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"{file}: expected two columns per line")
    user_ids, users = _dense(pairs[:, 0])
    item_ids, items = _dense(pairs[:, 1])
    rng = np.random.default_rng(seed)
    order = np.argsort(users, kind="stable")
    train, test = [], []
    for u_items in np.split(items[order], np.cumsum(np.bincount(users, minlength=len(user_ids)))[:-1]):
        u_items = rng.permutation(u_items)
        n_test = max(1, int(round(0.2 * len(u_items))))
        test.append(np.sort(u_items[:n_test]))
        train.append(np.sort(u_items[n_test:]))
    users_table = {}
    ufile = _file(path, "users.dat")
    for n, line in enumerate(ufile.read_text(encoding="latin-1").splitlines(), 1):
        f = line.split("::")
        if len(f) != 5:
            raise ValueError(f"{ufile}:{n}: expected 5 '::'-separated fields")
        users_table[_ints([f[0]], ufile, n)[0]] = (f[1], f[2], f[3])
    movies = {}
    mfile = _file(path, "movies.dat")
    for n, line in enumerate(mfile.read_text(encoding="latin-1").splitlines(), 1):
        f = line.split("::")
        if len(f) != 3:
            raise ValueError(f"{mfile}:{n}: expected 3 '::'-separated fields")
        year = f[1].strip()[-5:-1]
        movies[_ints([f[0]], mfile, n)[0]] = (f[2].split("|")[0], year[:3])
    ufeat, ucard = _categorical([[users_table[u][j] for u in user_ids] for j in range(3)])
    ifeat, icard = _categorical([[movies.get(i, ("none", "none"))[j] for i in item_ids] for j in range(2)])
    return assemble("ml-1m", len(user_ids), len(item_ids), train, test, seed, user_features=ufeat,
                   user_cardinalities=ucard, item_features=ifeat, item_cardinalities=icard,
                   user_ids=user_ids, item_ids=item_ids)


SYNTHETIC_PER_USER = 30  # items each synthetic user draws
SEGMENT_VALUES = 16  # values of each of the 2 user and 2 item features: 256 segments, 256 categories


def affinity_table(seed: int = 0, liked: int = 16) -> np.ndarray:
    """(256, 256) bool: which item categories each user segment likes, ``liked`` of 256
    at random per segment. The synthetic ground truth."""
    rng = np.random.default_rng([seed, 1])
    n = SEGMENT_VALUES**2
    table = np.zeros((n, n), dtype=bool)
    for row in table:
        row[rng.choice(n, size=liked, replace=False)] = True
    return table


def synthetic(n_users: int = 3000, n_items: int = 1000, *, per_user: int = SYNTHETIC_PER_USER, seed: int = 0) -> InteractionData:
    """Users with 2 categorical features (16 values each: 256 segments) and items with 2
    (256 categories). A segment likes 16 of the 256 categories, drawn at random
    (``affinity_table``): a feature cross with no structure to exploit, whose 256 x 256
    pattern a dot product can only approximate (at d = 16 badly, at d = 64 well enough
    to rank; docs/accuracy.md), while a scorer over (user, item) can learn it cell by cell.
    Item logits: 4 for a liked category, plus a power-law popularity. Each user draws
    ``per_user`` items; 20% go to test."""
    for name, value in (("n_users", n_users), ("per_user", per_user)):
        if value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    if n_items < per_user:
        raise ValueError(f"n_items: expected at least per_user ({per_user}) items, got {n_items}")
    rng = np.random.default_rng(seed)
    ufeat = rng.integers(0, SEGMENT_VALUES, size=(n_users, 2))
    ifeat = rng.integers(0, SEGMENT_VALUES, size=(n_items, 2))
    table = affinity_table(seed)
    popularity = np.log(1.0 / (1 + rng.permutation(n_items))) * 0.5
    segment, category = ufeat @ [SEGMENT_VALUES, 1], ifeat @ [SEGMENT_VALUES, 1]
    train, test = [], []
    for u in range(n_users):
        logits = popularity + 4.0 * table[segment[u], category]
        p = np.exp(logits - logits.max())
        items = rng.choice(n_items, size=per_user, replace=False, p=p / p.sum())
        cut = int(per_user * 0.8)
        train.append(np.sort(items[:cut]))
        test.append(np.sort(items[cut:]))
    cards = (SEGMENT_VALUES, SEGMENT_VALUES)
    return assemble("synthetic", n_users, n_items, train, test, seed, user_features=ufeat.astype(np.int64),
                   user_cardinalities=cards, item_features=ifeat.astype(np.int64), item_cardinalities=cards)
