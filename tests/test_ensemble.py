"""Code families in one index and tower codes, against sums written out with loops."""

import json
import re

import numpy as np
import pytest
import torch

from sparcode.engine import CodeIndex, Engine
from sparcode.training import defaults
from sparcode.training.data import InteractionData, synthetic
from sparcode.training.ensemble import bag_scores, fit_weights, joined_bags, joined_index, length_weights
from sparcode.training.item_codes import history_bags
from sparcode.training.tower_codes import residual_codebooks, tower_bags, tower_code_indexes


def random_index(n_codes: int, n_items: int, seed: int) -> tuple[CodeIndex, np.ndarray]:
    """A random index and its dense (V, N) matrix (absent pairs 0)."""
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n_codes, n_items)) < 0.4, rng.normal(size=(n_codes, n_items)), 0.0).astype(np.float32)
    rows, cols = np.nonzero(dense)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_codes))])
    return CodeIndex.from_postings(indptr, cols.astype(np.int32), dense[rows, cols], n_items), dense


def random_bags(n_users: int, n_codes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lists = [rng.integers(0, n_codes, size=rng.integers(0, 5)) for _ in range(n_users)]
    return (np.concatenate(lists).astype(np.int64),
            np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64))


def test_one_search_over_joined_families_sums_each_familys_weighted_scores():
    n_items, users = 12, 7
    (a, dense_a), (b, dense_b) = random_index(5, n_items, 0), random_index(3, n_items, 1)
    bags_a, bags_b = random_bags(users, 5, 2), random_bags(users, 3, 3)
    rng = np.random.default_rng(4)
    w_a, w_b = rng.random(bags_a[0].size).astype(np.float32), rng.random(bags_b[0].size).astype(np.float32)
    codes, offsets, weights = joined_bags([bags_a, bags_b], [5, 3], [w_a, w_b])
    expected = np.zeros((users, n_items))
    for u in range(users):
        for j in range(bags_a[1][u], bags_a[1][u + 1]):
            expected[u] += w_a[j] * dense_a[bags_a[0][j]]
        for j in range(bags_b[1][u], bags_b[1][u + 1]):
            expected[u] += w_b[j] * dense_b[bags_b[0][j]]
        mine = codes[offsets[u] : offsets[u + 1]]
        assert (mine == np.concatenate([bags_a[0][bags_a[1][u] : bags_a[1][u + 1]],
                                        bags_b[0][bags_b[1][u] : bags_b[1][u + 1]] + 5])).all()
    index = joined_index([a, b])
    assert index.n_codes == 8 and index.nnz == a.nnz + b.nnz
    np.testing.assert_allclose(bag_scores(index, (codes, offsets), np.arange(users), weights), expected, atol=1e-5)
    result = Engine(index).search(torch.from_numpy(codes), k=n_items, offsets=torch.from_numpy(offsets),
                                  weights=torch.from_numpy(weights))
    listed = [set(np.nonzero(dense_a[bags_a[0][bags_a[1][u] : bags_a[1][u + 1]]].any(0)
                             | dense_b[bags_b[0][bags_b[1][u] : bags_b[1][u + 1]]].any(0))[0].tolist()) for u in range(users)]
    for u in range(users):
        ids = result.ids[u][result.ids[u] >= 0].numpy()
        assert set(ids.tolist()) == listed[u]
        np.testing.assert_allclose(result.scores[u][: ids.size].numpy(), expected[u][ids], atol=1e-5)
        assert (np.diff(result.scores[u][: ids.size].numpy()) <= 1e-6).all()


def test_length_weights_and_errors_name_the_argument():
    bags = (np.array([3, 1, 2, 0, 4, 4]), np.array([0, 1, 1, 6]))
    np.testing.assert_allclose(length_weights(bags, 1.0), [1, 0.2, 0.2, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(length_weights(bags, 0.5), [1] + [5**-0.5] * 5, rtol=1e-6)
    assert (length_weights(bags, 0.0) == 1).all()
    a, _ = random_index(3, 4, 0)
    b, _ = random_index(3, 5, 1)
    with pytest.raises(ValueError, match="indexes: every family must list the same items"):
        joined_index([a, b])
    with pytest.raises(ValueError, match="bags: every family must have the same queries"):
        joined_bags([random_bags(3, 3, 0), random_bags(4, 3, 1)], [3, 3], [np.ones(0), np.ones(0)])
    bags = random_bags(3, 3, 0)
    with pytest.raises(ValueError, match="weights: expected one per code"):
        joined_bags([bags], [3], [np.ones(bags[0].size + 1)])


def oracle(data: InteractionData) -> tuple[CodeIndex, tuple[np.ndarray, np.ndarray]]:
    """A family with one code per user whose list is that user's validation items."""
    return (CodeIndex.from_postings(data.valid.indptr.astype(np.int64), data.valid.items.astype(np.int32),
                                    np.ones(data.valid.items.size, np.float32), data.n_items),
            (np.arange(data.n_users, dtype=np.int64), np.arange(data.n_users + 1, dtype=np.int64)))


def test_fit_weights_takes_a_family_that_helps_on_validation_and_leaves_one_that_does_not():
    data = synthetic(300, 100, seed=0)
    bags = history_bags(data.train)
    base, dense = random_index(100, 100, 5)
    noise = random_index(40, 100, 6)[0], random_bags(300, 40, 7)
    index, joined, best, grid = fit_weights(data, (base, bags), {"oracle": oracle(data), "noise": noise},
                                            powers=[0.0, 1.0], weights=[0.0, 1.0, 4.0], metric="recall@20")
    assert len(grid) == 12 and best["added"] == "oracle" and best["weight"] > 0
    assert best["valid_recall@20"] == max(p["valid_recall@20"] for p in grid)
    noise_only = fit_weights(data, (base, bags), {"noise": noise}, powers=[0.0], weights=[0.0, 1.0, 4.0],
                             metric="recall@20")[2]
    alone = [p for p in grid if p["added"] == "noise" and p["weight"] == 0.0][0]["valid_recall@20"]
    assert noise_only["weight"] == 0.0 or noise_only["valid_recall@20"] > alone
    assert index.n_codes == 100 + 300 and joined[2].dtype == np.float32


def test_residual_codebooks_reconstruct_better_with_each_level_and_exactly_with_a_centre_each():
    users = torch.randn(60, 6, generator=torch.Generator().manual_seed(0))
    errors = []
    for levels in (1, 2, 4):
        centres, codes = residual_codebooks(users, levels, 8, seed=0)
        assert centres.shape == (levels, 8, 6) and codes.shape == (60, levels)
        approx = sum(centres[t][codes[:, t]] for t in range(levels))
        errors.append(float((users - approx).pow(2).sum()))
    assert errors[0] > errors[1] > errors[2]
    centres, codes = residual_codebooks(users, 1, 60, seed=0)
    torch.testing.assert_close(centres[0][codes[:, 0]], users)
    with pytest.raises(ValueError, match="levels: expected a positive int"):
        residual_codebooks(users, 0, 8)


@pytest.mark.parametrize("cap", [7, 3])
def test_tower_codes_serve_the_quantized_users_products_with_the_items(cap):
    gen = torch.Generator().manual_seed(1)
    users, items = torch.randn(30, 5, generator=gen), torch.randn(7, 5, generator=gen)
    centres, codes = residual_codebooks(users, 3, 4, seed=0)
    bags = tower_bags(codes, 4)
    index = tower_code_indexes(centres, items, [cap], ["magnitude"])["magnitude", cap]
    assert index.n_codes == 12 and (np.diff(bags[1]) == 3).all()
    for u in range(30):
        assert (bags[0][3 * u : 3 * u + 3] == codes[u].numpy() + [0, 4, 8]).all()
    expected = np.zeros((30, 7))
    for u in range(30):
        for t in range(3):
            row = (centres[t, codes[u, t]] @ items.T).numpy()
            kept = np.argsort(-np.abs(row), kind="stable")[:cap]
            expected[u, kept] += row[kept]
    np.testing.assert_allclose(bag_scores(index, bags, np.arange(30)), expected, atol=1e-5)
    if cap == 7:  # every item listed: the sum is the reconstructed user's product
        approx = sum(centres[t][codes[:, t]] for t in range(3))
        np.testing.assert_allclose(expected, (approx @ items.T).numpy(), atol=1e-5)


def test_tower_vectors_are_the_two_towers_scores(tmp_path):
    from sparcode.training.models import TwoTower
    from sparcode.training.tower_codes import tower_vectors
    from sparcode.training.train import TrainConfig, full_scores, tensors

    data = synthetic(50, 40, seed=1)
    cfg = TrainConfig(device="cpu")
    torch.manual_seed(0)
    model = TwoTower(data, dim=8).eval()
    users, items = tower_vectors(model, data, cfg, rows=16)
    expected = full_scores(model, data, cfg, np.arange(50), tensors(data, cfg))
    torch.testing.assert_close(users @ items.T, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="model: expected a TwoTower"):
        tower_vectors(torch.nn.Linear(2, 2), data, cfg)


def test_accuracy_bench_joins_graph_filter_and_tower_codes_on_validation(tmp_path, capsys):
    from sparcode.bench import accuracy

    argv = ["--dataset", "synthetic", "--synthetic-size", "300", "100", "--out", str(tmp_path), "--models",
            "two_tower", "graph_filter", "graph_filter_tower", "--epochs", "2", "--cap-density", "0.1",
            "--graph-filter-grid", "0.3:8", "--tower-levels", "2", "--tower-size", "16", "--ensemble-powers", "0", "1",
            "--ensemble-weights", "0", "1", "--two-tower-hidden", "16", "--no-progress"]
    assert accuracy.main(argv) == 0
    report = json.loads((tmp_path / "accuracy-synthetic.json").read_text())
    assert report["models"]["two_tower"]["tokenizer_hidden"] == [16] == report["config"]["model"]["two_tower_hidden"]
    entry = report["models"]["graph_filter_tower"]
    assert len(entry["grid"]) == 4 and entry["selected_on"] == "valid_recall@20"
    best = max(entry["grid"], key=lambda p: (p["valid_recall@20"], -p["weight"]))
    assert (entry["power"], entry["weight"]) == (best["power"], best["weight"])
    assert entry["levels"] == 2 and entry["size"] == 16 and entry["added_cap"] == 10 and entry["recall@20"] > 0
    with pytest.raises(SystemExit):
        accuracy.main([a if a != "graph_filter" else "item_codes" for a in argv])
    assert "graph_filter_tower joins this run's two_tower and graph_filter" in capsys.readouterr().err


def test_item_codes_command_serves_a_two_towers_tower_codes_beside_the_item_codes(tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq

    from sparcode.cli import main
    from sparcode.training.checkpoint import load_checkpoint

    ckpt, out = tmp_path / "tower", tmp_path / "items"
    small = ["--data", "synthetic"]
    assert main(["train", *small, "--model", "two_tower", "--epochs", "2", "--out", str(ckpt), "--device", "cpu",
                 "--no-progress"]) == 0
    assert main(["item-codes", *small, "--out", str(tmp_path / "screened"), "--cap", "10", "--tower", str(ckpt)]) == 0
    tower = json.loads((tmp_path / "screened" / "metrics.json").read_text())["tower"]
    assert len(tower["grid"]) == 15 and tower["added"] == 10
    assert (tower["valid_recall@20"], -tower["weight"]) == max((p["valid_recall@20"], -p["weight"]) for p in tower["grid"])
    codes = Engine.load(tmp_path / "screened" / "index").index.n_codes
    assert codes == (800 if tower["weight"] == 0 else 800 + 8 * 256)  # weight 0: the item codes alone
    monkeypatch.setattr(defaults, "ENSEMBLE_POWERS", (0.5,))
    monkeypatch.setattr(defaults, "ENSEMBLE_WEIGHTS", (2.0,))
    assert main(["item-codes", *small, "--out", str(out), "--cap", "10", "--tower", str(ckpt)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    tower = report["tower"]
    assert (tower["power"], tower["weight"]) == (0.5, 2.0) and report["metrics"]["recall@20"] > 0
    index = Engine.load(out / "index").index
    assert index.n_codes == 800 + 8 * 256
    bags = pq.read_table(out / "queries.parquet").to_pydict()
    model, data, _ = load_checkpoint(ckpt)
    user = 5
    codes, weights = np.array(bags["codes"][user]), np.array(bags["weights"][user])
    history = np.concatenate([data.train.row(user), data.valid.row(user)])
    n_history = history.size
    assert sorted(codes[:n_history].tolist()) == sorted(history.tolist())
    assert (codes[n_history:] >= 800).all() and codes.size - n_history == 8
    np.testing.assert_allclose(weights[:n_history], n_history ** -tower["power"], rtol=1e-6)
    np.testing.assert_allclose(weights[n_history:], tower["weight"] * tower["scale"], rtol=1e-6)
    assert main(["recommend", str(out / "index"), "--queries", str(out / "queries.parquet"), "--k", "5",
                 "--out", str(tmp_path / "recs"), "--no-progress"]) == 0
    recs = pq.read_table(sorted((tmp_path / "recs").glob("part-*.parquet"))).to_pydict()
    want = Engine(index).search(torch.from_numpy(codes), k=5, offsets=torch.tensor([0, codes.size]),
                                weights=torch.from_numpy(weights.astype(np.float32))).ids[0].tolist()
    assert recs["item_ids"][recs["user_id"].index(user)] == want
    other = tmp_path / "other.csv"
    other.write_text("user_id,item_id\n" + "".join(f"{u},{i}\n" for u in range(30) for i in range(u % 7, u % 7 + 6)))
    for argv, message in (([*small, "--tower", str(tmp_path / "none")], "--tower: .*cannot read a checkpoint"),
                          (["--data", "interactions", "--path", str(other), "--holdout", "0.2", "--tower", str(ckpt)],
                           "--tower: .* was trained on synthetic"),
                          ([*small, "--tower", str(ckpt), "--shard-items"], "--tower: joins a second code family on one process")):
        assert main(["item-codes", *argv, "--out", str(tmp_path / "bad"), "--cap", "10"]) != 0
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "bad" / "metrics.json").exists()
