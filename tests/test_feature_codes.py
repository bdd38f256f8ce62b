"""Feature codes: codes and lifts against counts written out with loops, the family beside
graph-filter codes in the accuracy bench and in ``sparcode item-codes --features``."""

import json
import re
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sparcode.engine import Engine
from sparcode.training.data import CSR, synthetic
from sparcode.training.feature_codes import feature_codes, feature_family, lift_rows


def test_feature_codes_give_each_value_and_each_pair_held_one_dense_id():
    features = np.array([[0, 1, 5], [0, 2, 5], [1, 1, 5], [0, 1, 5]])
    codes, n_codes = feature_codes(features)
    # feature 0: {0, 1}; feature 1: {1, 2}; feature 2: {5}; pairs (0,1): {01, 02, 11}; (0,2): {05, 15}; (1,2): {15, 25}
    assert n_codes == 2 + 2 + 1 + 3 + 2 + 2
    want = [[0, 2, 4, 5, 8, 10], [0, 3, 4, 6, 8, 11], [1, 2, 4, 7, 9, 10], [0, 2, 4, 5, 8, 10]]
    assert codes.tolist() == want and codes.dtype == np.int64
    single, one = feature_codes(np.array([[3], [7], [3]]))
    assert single.tolist() == [[0], [1], [0]] and one == 2
    for bad, message in ((np.array([1, 2]), "features: expected a .users, F >= 1. integer matrix"),
                         (np.array([[0.5]]), "integer matrix"), (np.array([[1], [-1]]), "categorical ids >= 0")):
        with pytest.raises(ValueError, match=message):
            feature_codes(bad)


def reference_lift(train: CSR, codes: np.ndarray, n_codes: int, n_items: int) -> np.ndarray:
    """score(c, i) = n(c, i) / n(c) - n(i) / n with loops; 0 for a code whose users took nothing."""
    out = np.zeros((n_codes, n_items))
    n_item = np.zeros(n_items)
    for u in range(codes.shape[0]):
        for i in train.row(u):
            n_item[i] += 1
    for c in range(n_codes):
        counts = np.zeros(n_items)
        for u in range(codes.shape[0]):
            if c in codes[u]:
                for i in train.row(u):
                    counts[i] += 1
        if counts.sum() > 0:
            out[c] = counts / counts.sum() - n_item / n_item.sum()
    return out


@pytest.mark.parametrize("rows", [3, None])
def test_lift_rows_are_each_codes_lift_over_the_users_who_hold_it(rows):
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 12
    features = rng.integers(0, 3, size=(n_users, 2))
    features[5] = [7, 7]  # codes of their own: a user with no interactions
    lists = [np.sort(rng.choice(n_items, size=rng.integers(1, 6), replace=False)) for _ in range(n_users)]
    lists[5] = np.zeros(0, np.int64)
    train = CSR.from_lists(lists)
    codes, n_codes = feature_codes(features)
    got = torch.cat(list(lift_rows(train, codes, n_codes, n_items, rows=rows))).numpy()
    want = reference_lift(train, codes, n_codes, n_items)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (got[codes[5]] == 0).all() and np.abs(got).sum() > 0
    with pytest.raises(ValueError, match="codes: expected one row per user"):
        next(lift_rows(train, codes[:3], n_codes, n_items))
    with pytest.raises(ValueError, match="train: no interactions"):
        next(lift_rows(CSR.from_lists([np.zeros(0, np.int64)] * n_users), codes, n_codes, n_items))


def test_feature_family_serves_each_users_lifts_capped_by_magnitude():
    data = synthetic(120, 60, seed=1)
    codes, n_codes = feature_codes(data.user_features)
    lift = torch.cat(list(lift_rows(data.train, codes, n_codes, data.n_items))).numpy()
    family = feature_family(data, [60, 5])
    index, (flat, offsets) = family[60]
    assert index.n_codes == n_codes and flat.tolist() == codes.ravel().tolist()
    assert offsets.tolist() == list(range(0, 3 * 121, 3))
    user = 7
    got = Engine(index).search(torch.from_numpy(codes[user]), k=60, offsets=torch.tensor([0, 3]))
    dense = lift[codes[user]].sum(0)
    ids, scores = got.ids[0][got.ids[0] >= 0].numpy(), got.scores[0][got.ids[0] >= 0].numpy()
    assert sorted(ids.tolist()) == np.flatnonzero(np.abs(lift[codes[user]]).sum(0) > 0).tolist()
    np.testing.assert_allclose(scores, dense[ids], atol=1e-6)
    assert (np.diff(scores) <= 0).all()
    small = family[5][0]
    for c in range(n_codes):
        items = small.items[small.indptr[c] : small.indptr[c + 1]].numpy()
        assert items.size <= 5 and np.abs(lift[c, items]).min(initial=np.inf) >= np.sort(np.abs(lift[c]))[-5] - 1e-7
    with pytest.raises(ValueError, match="data: synthetic has no user features"):
        feature_family(replace(data, user_features=None), [5])


def test_accuracy_bench_joins_graph_filter_and_feature_codes_on_validation(tmp_path, capsys):
    from sparcode.bench import accuracy

    argv = ["--dataset", "synthetic", "--synthetic-size", "300", "100", "--out", str(tmp_path), "--models",
            "graph_filter", "graph_filter_features", "--cap-density", "0.1", "--graph-filter-grid", "0.3:8",
            "--ensemble-powers", "0", "1", "--ensemble-weights", "0", "1", "--no-progress"]
    assert accuracy.main(argv) == 0
    report = json.loads((tmp_path / "accuracy-synthetic.json").read_text())
    entry = report["models"]["graph_filter_features"]
    assert len(entry["grid"]) == 4 and entry["selected_on"] == "valid_recall@20" and entry["added_cap"] == 10
    best = max(entry["grid"], key=lambda p: (p["valid_recall@20"], -p["weight"]))
    assert (entry["power"], entry["weight"]) == (best["power"], best["weight"]) and entry["recall@20"] > 0
    with pytest.raises(SystemExit):
        accuracy.main([a for a in argv if a != "graph_filter"])
    assert "graph_filter_features joins this run's graph_filter; list it before it" in capsys.readouterr().err


def test_item_codes_command_serves_feature_codes_beside_the_graph_filter(tmp_path, capsys):
    from sparcode.cli import main

    out = tmp_path / "items"
    assert main(["item-codes", "--data", "synthetic", "--scores", "graph-filter", "--graph-filter-grid", "0.3:64",
                 "--cap", "40", "--features", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    chosen = report["features"]
    assert len(chosen["grid"]) == 15 and chosen["added"] == 40
    assert (chosen["valid_recall@20"], -chosen["weight"]) == max((p["valid_recall@20"], -p["weight"]) for p in chosen["grid"])
    assert chosen["weight"] > 0  # on the synthetic set the segment (a pair of features) carries the signal
    index = Engine.load(out / "index").index
    data = synthetic(2000, 800)
    codes, n_codes = feature_codes(data.user_features)
    assert index.n_codes == 800 + n_codes
    bags = pq.read_table(out / "queries.parquet").to_pydict()
    user = 11
    got, weights = np.array(bags["codes"][user]), np.array(bags["weights"][user])
    history = np.concatenate([data.train.row(user), data.valid.row(user)])
    assert sorted(got[: history.size].tolist()) == sorted(history.tolist()) and got[history.size :].tolist() == (codes[user] + 800).tolist()
    np.testing.assert_allclose(weights[: history.size], history.size ** -chosen["power"], rtol=1e-6)
    np.testing.assert_allclose(weights[history.size :], chosen["weight"] * chosen["scale"], rtol=1e-6)
    other = tmp_path / "other.csv"
    other.write_text("user_id,item_id\n" + "".join(f"{u},{i}\n" for u in range(30) for i in range(u % 7, u % 7 + 6)))
    for argv, message in (
            (["--data", "interactions", "--path", str(other), "--holdout", "0.2", "--features"],
             "--features: other has no user features"),
            (["--data", "synthetic", "--features", "--tower", str(tmp_path)], "--features: one added family per index"),
            (["--data", "synthetic", "--features", "--shard-items"], "--features: joins a second code family")):
        assert main(["item-codes", *argv, "--out", str(tmp_path / "bad"), "--cap", "10"]) != 0
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "bad" / "metrics.json").exists()
