"""A user's own interactions file (Parquet or CSV, ids of any type) in, results in those ids out."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparcode.cli import main
from sparcode.engine import Engine
from sparcode.training.interactions import Columns, Split, load_interactions, read_interactions

ROWS = [  # user, item, timestamp; (bob, a2) twice: it collapses to its latest time
    ("alice", "a1", "2024-01-01"), ("alice", "a2", "2024-01-02"), ("alice", "a3", "2024-01-05"),
    ("bob", "a2", "2024-01-01"), ("bob", "a3", "2024-01-03"), ("bob", "a4", "2024-01-04"),
    ("bob", "a5", "2024-01-02"), ("bob", "a2", "2024-01-06"), ("carol", "a5", "2024-02-01"),
]


def write_csv(path, rows, header=("user", "item", "ts")):
    path.write_text("\n".join([",".join(header), *(",".join(r) for r in rows)]) + "\n")
    return path


def lists(csr, n):
    return [csr.items[csr.indptr[u]:csr.indptr[u + 1]].tolist() for u in range(n)]


def test_text_ids_are_numbered_in_sorted_order_and_duplicates_collapse_to_their_latest_time(tmp_path):
    data = read_interactions(write_csv(tmp_path / "i.csv", ROWS), Columns("user", "item", "ts"))
    assert data.user_ids.tolist() == ["alice", "bob", "carol"] and data.item_ids.tolist() == ["a1", "a2", "a3", "a4", "a5"]
    pairs = sorted(zip(data.users.tolist(), data.items.tolist(), data.times.tolist()))
    day = 86400.0
    jan1 = 1704067200.0
    assert pairs == [(0, 0, jan1), (0, 1, jan1 + day), (0, 2, jan1 + 4 * day),
                     (1, 1, jan1 + 5 * day), (1, 2, jan1 + 2 * day), (1, 3, jan1 + 3 * day), (1, 4, jan1 + day),
                     (2, 4, jan1 + 31 * day)]


def test_latest_holdout_takes_each_users_newest_items_and_never_all(tmp_path):
    path = write_csv(tmp_path / "i.csv", ROWS)
    data = load_interactions(path, columns=Columns("user", "item", "ts"), split=Split(0.34, "latest"))
    # alice a1 < a2 < a3: test a3; bob a5(02) < a3(03) < a4(04) < a2(06): 4 x 0.34 -> 1, test a2; carol has one item
    assert lists(data.test, 3) == [[2], [1], []]
    train = [sorted(a + b) for a, b in zip(lists(data.train, 3), lists(data.valid, 3))]
    assert train == [[0, 1], [2, 3, 4], [4]]
    most = load_interactions(path, columns=Columns("user", "item", "ts"), split=Split(0.9, "latest"))
    assert most.test.lengths.tolist() == [2, 3, 0]  # never a user's every item
    least = load_interactions(path, columns=Columns("user", "item", "ts"), split=Split(0.01, "latest"))
    assert least.test.lengths.tolist() == [1, 1, 0]  # at least one of every user with two or more
    everything = load_interactions(path, columns=Columns("user", "item", "ts"))
    assert everything.test.items.size == 0 and everything.n_users == 3 and everything.n_items == 5
    assert data.test_by == everything.test_by == "time"  # the latest to test; without a holdout the future is served
    untimed = load_interactions(path, columns=Columns("user", "item"), split=Split(0.34, "random"))
    assert untimed.test_by == "random"


def test_random_holdout_holds_out_the_fraction_per_user_seeded(tmp_path):
    rng = np.random.default_rng(3)
    rows = [(f"u{u}", f"i{i}", str(int(rng.integers(1e9)))) for u in range(40) for i in rng.choice(60, 10, replace=False)]
    path = write_csv(tmp_path / "i.csv", rows)
    split = Split(0.2, "random")
    a = load_interactions(path, columns=Columns("user", "item", "ts"), split=split, seed=1)
    b = load_interactions(path, columns=Columns("user", "item", "ts"), split=split, seed=1)
    c = load_interactions(path, columns=Columns("user", "item", "ts"), split=split, seed=2)
    assert (a.test.lengths == 2).all() and (a.train.lengths + a.valid.lengths == 8).all()
    assert np.array_equal(a.test.items, b.test.items) and not np.array_equal(a.test.items, c.test.items)
    latest = load_interactions(path, columns=Columns("user", "item", "ts"), split=Split(0.2, "latest"), seed=1)
    assert not np.array_equal(a.test.items, latest.test.items) and (a.test_by, latest.test_by) == ("random", "time")
    for u in range(40):  # the latest holdout's items are each user's two newest
        times = {(r[1]): int(r[2]) for r in rows if r[0] == latest.user_ids[u]}
        newest = sorted(times, key=times.get)[-2:]
        assert sorted(latest.item_ids[latest.test.row(u)].tolist()) == sorted(newest)


def test_integer_ids_stay_integers_and_padded_ones_stay_text(tmp_path):
    data = read_interactions(write_csv(tmp_path / "n.csv", [("10", "7", "1"), ("2", "30", "2")]), Columns("user", "item"))
    assert data.user_ids.dtype == np.int64 and data.user_ids.tolist() == [2, 10] and data.item_ids.tolist() == [7, 30]
    data = read_interactions(write_csv(tmp_path / "z.csv", [("1", "007", "1"), ("2", "7", "2")]), Columns("user", "item"))
    assert data.item_ids.tolist() == ["007", "7"] and data.user_ids.tolist() == [1, 2]
    pq.write_table(pa.table({"u": pa.array([5, 5, 9], pa.int32()), "i": ["x", "y", "x"],
                             "t": pa.array([3, 1, 2], pa.timestamp("s"))}), tmp_path / "p.parquet")
    data = read_interactions(tmp_path / "p.parquet", Columns("u", "i", "t"))
    assert data.user_ids.tolist() == [5, 9] and data.times.tolist() == [3.0, 1.0, 2.0]


@pytest.mark.parametrize("text, columns, message", [
    ("user,item\nu1,a\nu2,b,c\n", ("user", "item", None), "b.csv: line 3: expected 2 fields, got 3"),
    ("user,item\nu1,a\nu2,\n", ("user", "item", None), "b.csv: line 3: column 'item': empty id"),
    ("user,item\nu1,a\n ,b\n", ("user", "item", None), "b.csv: line 3: column 'user': empty id"),
    ("user,item,ts\nu1,a,2024-01-01\nu2,b,2024-01-02\nu3,c,soon\n", ("user", "item", "ts"),
     "b.csv: line 4: column 'ts': cannot read 'soon' as a timestamp"),
    ("user,item,ts\nu1,a,1\nu2,b,x\n", ("user", "item", "ts"), "b.csv: line 3: column 'ts': cannot read 'x'"),
    ("user,item\nu1,a\n", ("uid", "item", None), "b.csv: no column 'uid' (columns: user, item)"),
])
def test_a_bad_row_names_the_file_the_row_and_the_column(tmp_path, text, columns, message):
    (tmp_path / "b.csv").write_text(text)
    with pytest.raises(ValueError) as err:
        read_interactions(tmp_path / "b.csv", Columns(*columns))
    assert message in str(err.value)


def test_a_bad_parquet_row_and_bad_settings_are_named(tmp_path):
    pq.write_table(pa.table({"user_id": ["a", None, "c"], "item_id": [1, 2, 3]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet: row 2: column 'user_id': empty id"):
        read_interactions(tmp_path / "p.parquet")
    pq.write_table(pa.table({"user_id": ["a"], "item_id": [1.5]}), tmp_path / "f.parquet")
    with pytest.raises(ValueError, match="f.parquet: row 1: column 'item_id': ids must be integers or text"):
        read_interactions(tmp_path / "f.parquet")
    with pytest.raises(ValueError, match="--holdout: expected a fraction"):
        Split(1.0)
    with pytest.raises(ValueError, match="--holdout-by: 'latest' needs a timestamp column"):
        load_interactions(tmp_path / "p.parquet", split=Split(0.2, "latest"))
    (tmp_path / "events.json").write_text("{}")
    with pytest.raises(ValueError, match="path: .*events.json: expected a .csv, .tsv or .parquet"):
        read_interactions(tmp_path / "events.json")


def interactions(n_users=120, n_items=60, seed=0):
    """A small catalogue with structure: each user's items cluster around a favourite."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        centre = rng.integers(n_items)
        for i in set(((centre + rng.integers(-4, 5, size=8)) % n_items).tolist()):
            rows.append((f"user-{u:03d}", f"SKU-{i:02d}", f"2024-03-{1 + int(rng.integers(28)):02d}T12:00:00Z"))
    return rows


def test_item_codes_and_recommend_speak_the_files_text_ids(tmp_path, capsys):
    rows = interactions()
    path = write_csv(tmp_path / "events.csv", rows, ("visitor", "sku", "at"))
    out = tmp_path / "codes"
    assert main(["item-codes", "--data", "interactions", "--path", str(path), "--user-column", "visitor",
                 "--item-column", "sku", "--time-column", "at", "--cap", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "no test split" in printed.out and "--item-ids" in printed.err
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"] is None
    item_ids = pq.read_table(out / "item_ids.parquet").column("item_id").to_pylist()
    assert item_ids == sorted({r[1] for r in rows})
    bags = pq.read_table(out / "queries.parquet").to_pydict()
    history = {}
    for user, item, _ in rows:
        history.setdefault(user, set()).add(item)
    assert bags["user_id"] == sorted(history)  # every interaction goes into the bags without a holdout
    assert all({item_ids[c] for c in codes} == history[u] for u, codes in zip(bags["user_id"], bags["codes"]))
    assert main(["recommend", str(out / "index"), "--queries", str(out / "queries.parquet"), "--exclude",
                 str(out / "seen.parquet"), "--item-ids", str(out / "item_ids.parquet"), "--k", "5", "--out",
                 str(tmp_path / "recs"), "--no-progress"]) == 0
    recs = pq.read_table(sorted((tmp_path / "recs").glob("part-*.parquet"))).to_pydict()
    assert sorted(recs["user_id"]) == sorted(history)
    engine = Engine.load(out / "index")
    for user, items in zip(recs["user_id"], recs["item_ids"]):
        assert not set(items) & history[user]  # the history is left out, matched by the text ids
        codes = [item_ids.index(i) for i in history[user]]
        want = engine.search(np.array(codes), k=5, offsets=np.array([0, len(codes)]),
                             exclude=[np.array(codes)]).ids[0]
        assert items == [item_ids[i] if i >= 0 else None for i in want]
    with pytest.raises(ValueError, match="--exclude: holds text item ids; they need the item-ids file"):
        from sparcode.engine.recommend import run_job

        run_job(out / "index", out / "queries.parquet", tmp_path / "again", k=5, exclude_path=out / "seen.parquet",
                progress=False)


def test_integer_ids_go_into_the_index_and_a_holdout_is_measured(tmp_path, capsys):
    rows = interactions(seed=1)
    users = {u: 1000 + n for n, u in enumerate(sorted({r[0] for r in rows}))}
    table = pa.table({"user_id": [users[r[0]] for r in rows], "item_id": [int(r[1][4:]) * 11 for r in rows],
                      "ts": [r[2] for r in rows]})
    pq.write_table(table, tmp_path / "events.parquet")
    out = tmp_path / "codes"
    assert main(["item-codes", "--data", "interactions", "--path", str(tmp_path / "events.parquet"), "--time-column",
                 "ts", "--holdout", "0.2", "--holdout-by", "latest", "--cap", "20", "--out", str(out)]) == 0
    assert "test Recall@20" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["metrics"]["recall@20"] > 0
    assert not (out / "item_ids.parquet").exists()
    index = Engine.load(out / "index").index
    assert index.item_ids.tolist() == sorted({int(r[1][4:]) * 11 for r in rows})
    assert main(["recommend", str(out / "index"), "--queries", str(out / "queries.parquet"), "--exclude",
                 str(out / "seen.parquet"), "--k", "3", "--out", str(tmp_path / "recs"), "--no-progress"]) == 0
    recs = pq.read_table(sorted((tmp_path / "recs").glob("part-*.parquet"))).to_pydict()
    seen = pq.read_table(out / "seen.parquet").to_pydict()
    known = dict(zip(seen["user_id"], map(set, seen["item_ids"])))
    assert set(recs["user_id"]) == set(users.values())
    assert all(set(items) <= set(index.item_ids.tolist()) and not set(items) & known[u]
               for u, items in zip(recs["user_id"], recs["item_ids"]))


def test_train_reads_an_interactions_file_and_its_checkpoint_reloads_it(tmp_path, capsys):
    from sparcode.training.checkpoint import load_checkpoint

    path = write_csv(tmp_path / "events.csv", interactions(seed=2), ("visitor", "sku", "at"))
    out = tmp_path / "tt"
    assert main(["train", "--data", "interactions", "--path", str(path), "--user-column", "visitor", "--item-column",
                 "sku", "--holdout", "0.2", "--model", "two_tower", "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    model, data, config = load_checkpoint(out)
    assert config["data"]["columns"] == {"user": "visitor", "item": "sku", "time": None}
    assert data.item_ids[0] == "SKU-00" and data.test.items.size > 0


def test_graph_filter_codes_without_a_holdout_serve_every_interaction(tmp_path):
    """With no test split, the graph filter chosen on a wide screen is refitted on every
    user's training and validation items: the served index is that fit, built here."""
    from sparcode.training.checkpoint import load_data
    from sparcode.training.data import CSR
    from sparcode.training.evaluate import seen_items
    from sparcode.training.graph_filter import graph_filter_index
    from sparcode.training.interactions import Columns, Split

    path = write_csv(tmp_path / "events.csv", interactions(seed=3), ("visitor", "sku", "at"))
    out = tmp_path / "codes"
    assert main(["item-codes", "--data", "interactions", "--path", str(path), "--user-column", "visitor", "--item-column",
                 "sku", "--cap", "20", "--scores", "graph-filter", "--graph-filter-grid", "0:0", "0.3:8", "--out",
                 str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["split"] == "wide" and len(report["grid"]) == 4  # two settings x two keep rules
    data = load_data("interactions", path, 0, columns=Columns("visitor", "sku", None), split=Split())
    known = CSR.from_lists(seen_items(data))
    assert data.valid.items.size > 0 and known.items.size == data.train.items.size + data.valid.items.size
    want = graph_filter_index(known, data.n_items, 20, alpha=report["alpha"], vectors=report["vectors"],
                              keep=report["keep"])
    got = Engine.load(out / "index").index
    assert torch.equal(got.indptr, want.indptr) and torch.equal(got.items, want.items)
    torch.testing.assert_close(got.scores, want.scores)


def test_user_features_join_the_interactions_users_by_id(tmp_path):
    from sparcode.training.interactions import with_user_features

    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id\n" + "".join(f"u{u},i{i}\n" for u in range(4) for i in range(u, u + 3)))
    data = load_interactions(events)  # users u0 u1 u2 u3
    feats = tmp_path / "users.csv"
    feats.write_text("user_id,age,city\nu2,30, Oslo\nu0,20,\nu9,40,Rome\nu1,20,Bergen\n")
    got = with_user_features(data, feats)
    # age: 20 -> 1, 30 -> 2, 40 -> 3 (0: absent); city: Bergen 1, Oslo 2, Rome 3 (0: empty or absent)
    assert got.user_features.tolist() == [[1, 0], [1, 1], [2, 2], [0, 0]] and got.user_cardinalities == (4, 4)
    table = pa.table({"uid": ["u1", "u3"], "segment": [7, None]})
    pq.write_table(table, tmp_path / "users.parquet")
    got = with_user_features(data, tmp_path / "users.parquet", "uid")
    assert got.user_features.tolist() == [[0], [1], [0], [0]] and got.user_cardinalities == (2,)
    for text, message in (("user_id,age\nu1,3\nu2,5\nu2,6\nu1,4\n", "line 4: column 'user_id': user 'u2' has a second row"),
                          ("user_id\nu1\n", "no feature columns besides the user column 'user_id'"),
                          ("user_id,age\nx1,3\n", "none of its 1 users is in the interactions"),
                          ("id,age\nu1,3\n", "no column 'user_id'")):
        feats.write_text(text)
        with pytest.raises(ValueError, match=message):
            with_user_features(data, feats)


def test_item_codes_serve_feature_codes_of_an_interactions_files_users(tmp_path, capsys, monkeypatch):
    from sparcode.training import defaults

    monkeypatch.setattr(defaults, "ENSEMBLE_WEIGHTS", (1.0,))  # the feature codes join whatever validation says
    rng = np.random.default_rng(0)
    segment = rng.integers(0, 4, size=200)  # each segment likes 10 of 40 items; users draw 3 of them and 5 at random
    lists = [np.concatenate([rng.choice(np.arange(10) + 10 * s, 3, replace=False),
                             rng.choice(np.setdiff1d(np.arange(40), np.arange(10) + 10 * s), 5, replace=False)])
             for s in segment]
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id\n" + "".join(f"{u},{i}\n" for u, items in enumerate(lists) for i in items))
    feats = tmp_path / "users.csv"
    feats.write_text("user_id,segment\n" + "".join(f"{u},s{segment[u]}\n" for u in range(200)))
    out = tmp_path / "out"
    base = ["item-codes", "--data", "interactions", "--path", str(events), "--holdout", "0.2", "--scores",
            "graph-filter", "--graph-filter-grid", "0.3:4", "--cap", "5"]
    assert main([*base, "--features", "--user-features", str(feats), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["features"]["added"] == 5 and len(report["features"]["grid"]) == 3
    assert Engine.load(out / "index").index.n_codes == 40 + 4  # one feature code per segment value
    bags = pq.read_table(out / "queries.parquet").to_pydict()
    user = bags["user_id"].index(7)
    assert bags["codes"][user][-1] == 40 + segment[7]  # segments s0..s3 take codes 40..43 in order
    for argv, message in (([*base, "--user-features", str(feats)], "--user-features: the users' features of an "),
                          ([*base, "--features"], "--features: events has no user features .*--user-features"),
                          ([*base, "--features", "--user-features", str(tmp_path / "none.csv")],
                           "--user-features: path: .*none.csv is not a file")):
        assert main([*argv, "--out", str(tmp_path / "bad")]) != 0
        assert __import__("re").search(message, capsys.readouterr().err)
