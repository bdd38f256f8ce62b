"""Item codes: the closed-form fit against a per-item ridge regression, the index rule,
history codes, search through Engine against a dense sum, and the accuracy bench."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sparcode.bench.timing import peak_rss_bytes, reset_peak_rss
from sparcode.engine import Engine
from sparcode.training.data import CSR
from sparcode.training.item_codes import _inverse_of_gram, ease_rows, history_bags, item_code_index, item_scores, ridge


def random_train(n_users: int, n_items: int, seed: int, per_user: tuple[int, int] = (1, 8)) -> CSR:
    rng = np.random.default_rng(seed)
    return CSR.from_lists([np.sort(rng.choice(n_items, size=rng.integers(*per_user), replace=False))
                           for _ in range(n_users)])


@pytest.mark.parametrize("n_users, n_items, rows", [(40, 12, 5), (10, 30, 7), (10, 30, 2048)])
def test_item_scores_solve_each_items_ridge_regression_on_the_others(n_users, n_items, rows):
    """Column j of B is the ridge regression of item j's column on every other item's,
    solved here one column at a time in float64: the constraint diag(B) = 0 separates.
    More users than items: the Gram's inverse; fewer: Woodbury's U x U inverse."""
    scale = 0.7
    train = random_train(n_users, n_items, seed=n_users)
    x = np.zeros((n_users, n_items))
    for u in range(n_users):
        x[u, train.row(u)] = 1
    lam = ridge(train, n_items, scale)
    got = torch.cat(list(ease_rows(train, n_items, l2_scale=scale, rows=rows))).double().numpy()
    assert got.shape == (n_items, n_items)
    for j in range(n_items):
        others = np.delete(np.arange(n_items), j)
        xo = x[:, others]
        expected = np.linalg.solve(xo.T @ xo + lam * np.eye(n_items - 1), xo.T @ x[:, j])
        np.testing.assert_allclose(got[others, j], expected, rtol=1e-4, atol=1e-6)
        assert got[j, j] == 0


@pytest.mark.parametrize("n_users, n_items", [(300, 120), (120, 300)])
def test_float32_fit_is_within_bounds_of_float64(n_users, n_items):
    train = random_train(n_users, n_items, seed=3, per_user=(2, 30))
    low, high = (item_scores(train, n_items, dtype=dtype).double() for dtype in (torch.float32, torch.float64))
    assert float((low - high).norm() / high.norm()) < 1e-5


def test_the_device_sparse_product_equals_scipys():
    """The CUDA path's torch CSR product, checked on CPU against scipy's."""
    import scipy.sparse

    from sparcode.training.item_codes import torch_csr

    a = scipy.sparse.random(30, 50, density=0.2, format="csr", dtype=np.float32, random_state=0)
    dense = torch.randn(50, 7)
    np.testing.assert_allclose((torch_csr(a, torch.device("cpu"), torch.float32) @ dense).numpy(),
                               a @ dense.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak reset")
def test_the_gram_inverse_holds_one_matrix_and_inverts_it():
    import scipy.sparse

    m = 4000
    a = scipy.sparse.random(m, 300, density=0.05, format="csr", dtype=np.float32, random_state=0)
    reset_peak_rss()  # the peak starts again from the current resident size
    before = peak_rss_bytes()
    inverse = _inverse_of_gram(a, 2.0, torch.device("cpu"), torch.float32, rows=512)
    grown = peak_rss_bytes() - before
    assert grown < 1.5 * m * m * 4  # the matrix itself (64 MB), not a second copy while LAPACK runs
    gram = torch.from_numpy((a @ a.T).toarray()).double() + 2.0 * torch.eye(m, dtype=torch.float64)
    assert torch.allclose(inverse.double() @ gram, torch.eye(m, dtype=torch.float64), atol=1e-3)


def test_ridge_is_a_multiple_of_the_mean_items_interactions_and_rejects_bad_input():
    train = CSR.from_lists([np.array([0, 1, 2]), np.array([1])])
    assert ridge(train, 8, 10.0) == pytest.approx(10.0 * 4 / 8)
    with pytest.raises(ValueError, match="l2_scale"):
        ridge(train, 8, 0.0)
    with pytest.raises(ValueError, match="train: no interactions"):
        ridge(CSR.from_lists([np.zeros(0, np.int64)]), 8)


def test_item_code_index_keeps_each_codes_largest_scores_by_magnitude_sorted_by_item():
    gen = torch.Generator().manual_seed(1)
    n_items, cap = 30, 5
    scores = torch.randn(n_items, n_items, generator=gen)
    scores[3] = 0.0  # a code with no non-zero score: an empty list
    scores[4] = 0.0
    scores[4, 7], scores[4, 2] = 0.5, -2.0  # fewer non-zero scores than the cap; the negative one kept
    scores[5, :3] = torch.tensor([-9.0, 8.0, -7.0])  # large negatives outrank small positives
    index = item_code_index(scores, cap, rows=7)
    assert index.n_codes == n_items and index.n_items == n_items  # code h is history item h
    for code in range(n_items):
        lo, hi = int(index.indptr[code]), int(index.indptr[code + 1])
        items = index.items[lo:hi].long()
        assert bool((items[1:] > items[:-1]).all())
        row = scores[code]
        expected = sorted(i for i in torch.argsort(row.abs(), descending=True)[:cap].tolist() if row[i] != 0)
        assert items.tolist() == expected
        assert torch.equal(index.scores[lo:hi], row[items])
    assert index.lengths[3] == 0 and index.lengths[4] == 2
    assert index.items[int(index.indptr[4]):int(index.indptr[5])].tolist() == [2, 7]
    assert {0, 1, 2} <= set(index.items[int(index.indptr[5]):int(index.indptr[6])].tolist())
    full = item_code_index(scores, 100)  # a cap above N keeps every non-zero score
    assert full.nnz == int((scores != 0).sum())


def test_item_code_index_keeps_each_codes_top_positive_scores_when_asked():
    gen = torch.Generator().manual_seed(2)
    n_items, cap = 30, 5
    scores = torch.randn(n_items, n_items, generator=gen)
    scores[3] = -1.0  # no positive score: an empty list
    scores[4, :2], scores[4, 2:] = 1.0, -9.0  # fewer positive scores than the cap; no negative kept
    scores[6] = 0.0
    scores[6, 9] = 0.5  # one positive score and zeros: the zeros are not kept
    index = item_code_index(scores, cap, keep="positive", rows=7)
    assert index.lengths[6] == 1 and bool((index.scores > 0).all())
    for code in range(n_items):
        lo, hi = int(index.indptr[code]), int(index.indptr[code + 1])
        row = scores[code]
        expected = sorted(i for i in torch.argsort(row, descending=True)[:cap].tolist() if row[i] > 0)
        assert index.items[lo:hi].tolist() == expected
        assert torch.equal(index.scores[lo:hi], row[index.items[lo:hi].long()])
    assert index.lengths[3] == 0 and index.lengths[4] == 2 and index.n_codes == n_items
    assert item_code_index(scores, 100, keep="positive").nnz == int((scores > 0).sum())
    with pytest.raises(ValueError, match="keep: expected one of magnitude, positive"):
        item_code_index(scores, cap, keep="top")
    with pytest.raises(ValueError, match="cap"):
        item_code_index(scores, 0)
    with pytest.raises(ValueError, match="scores: expected a square"):
        item_code_index(scores[:5], cap)
    with pytest.raises(ValueError, match="scores: expected a square"):
        item_code_index(scores[0], cap)


def test_history_bags_are_the_training_histories():
    train = CSR.from_lists([np.array([4, 7, 9]), np.zeros(0, np.int64), np.array([1])])
    codes, offsets = history_bags(train)
    assert codes.tolist() == [4, 7, 9, 1] and offsets.tolist() == [0, 3, 3, 4]
    assert codes.dtype == offsets.dtype == np.int64


def test_search_with_history_bags_is_the_sum_of_the_history_items_lists():
    n_users, n_items, k = 25, 40, 6
    train = random_train(n_users, n_items, seed=2, per_user=(0, 12))
    index = item_code_index(item_scores(train, n_items, l2_scale=0.5), cap=8)
    assert index.n_codes == n_items
    codes, offsets = history_bags(train)
    result = Engine(index).search(torch.from_numpy(codes), k=k, offsets=torch.from_numpy(offsets))
    dense = torch.zeros(n_items, n_items)
    for code in range(n_items):
        lo, hi = int(index.indptr[code]), int(index.indptr[code + 1])
        dense[code, index.items[lo:hi].long()] = index.scores[lo:hi].float()
    for u in range(n_users):
        history = torch.from_numpy(train.row(u))
        summed = dense[history].sum(0)
        candidate = (dense[history] != 0).any(0)
        expected = summed[candidate].sort(descending=True).values[:k]
        got = result.scores[u][: len(expected)]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        ids = result.ids[u][: len(expected)]
        torch.testing.assert_close(summed[ids], got, rtol=1e-5, atol=1e-6)
        assert (result.ids[u][len(expected):] == -1).all()


def test_accuracy_bench_fits_item_codes_and_searches_them(tmp_path, capsys):
    from sparcode.bench import accuracy

    argv = ["--dataset", "synthetic", "--synthetic-size", "300", "100", "--out", str(tmp_path),
            "--models", "item_codes", "--cap-density", "0.1", "--cap-densities", "0.02", "1", "--no-progress"]
    assert accuracy.main(argv) == 0
    report = json.loads((tmp_path / "accuracy-synthetic.json").read_text())
    entry = report["models"]["item_codes"]
    assert entry["cap"] == 10 and 0 < entry["density"] <= 0.1 and entry["recall@20"] > 0 and entry["bag_length"]["max"] >= 1
    assert report["config"]["model"]["item_codes_l2"] == 10.0 and entry["keep"] == "magnitude"
    sparse, full = entry["sparsity_curve"]
    assert sparse["cap"] == 2 and full["cap"] == 100 and sparse["density"] < entry["density"] <= full["density"]
    for flags, message in ((["--density", "0.1"], "--density: item_codes and graph_filter keep each code's top items"),
                           (["--item-codes-l2", "0"], "--item-codes-l2: expected a positive number")):
        with pytest.raises(SystemExit) as exit_:
            accuracy.main([a for a in argv if a not in ("--cap-density", "0.1")] + flags)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    positive = [*argv, "--item-codes-keep", "positive", "--cap-densities"]
    assert accuracy.main(positive) == 0
    entry = json.loads((tmp_path / "accuracy-synthetic.json").read_text())["models"]["item_codes"]
    assert entry["keep"] == "positive" and entry["nnz"] <= 10 * 100


def test_item_codes_command_writes_an_index_its_queries_and_metrics_that_recommend_serves(tmp_path, capsys):
    from sparcode.cli import main

    out = tmp_path / "items"
    assert main(["item-codes", "--data", "synthetic", "--out", str(out), "--cap-density", "0.05"]) == 0
    assert "item-codes:" in capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    bags = pq.read_table(out / "queries.parquet")
    index = Engine.load(out / "index").index
    lengths = [len(b) for b in bags.column("codes").to_pylist()]
    assert index.n_codes == index.n_items and bags.column("user_id").to_pylist() == list(range(2000))
    assert max(lengths) == report["bag_length"]["max"] and abs(np.mean(lengths) - report["bag_length"]["mean"]) < 1e-9
    assert report["metrics"]["recall@20"] > 0 and report["metrics"]["density"] <= 0.05
    assert main(["recommend", str(out / "index"), "--queries", str(out / "queries.parquet"), "--k", "5",
                 "--out", str(tmp_path / "recs"), "--no-progress"]) == 0
    recs = pq.read_table(sorted((tmp_path / "recs").glob("part-*.parquet"))).to_pydict()
    first = recs["user_id"].index(0)
    user0 = bags.column("codes").to_pylist()[0]
    want = Engine(index).search(torch.tensor(user0), k=5, offsets=torch.tensor([0, len(user0)])).ids[0].tolist()
    assert recs["item_ids"][first] == want
    assert main(["item-codes", "--data", "synthetic", "--out", str(tmp_path / "positive"), "--cap-density", "0.05",
                 "--keep", "positive"]) == 0
    assert json.loads((tmp_path / "positive" / "metrics.json").read_text())["keep"] == "positive"
    assert bool((Engine.load(tmp_path / "positive" / "index").index.scores > 0).all())
    assert main(["item-codes", "--data", "synthetic", "--out", str(tmp_path / "capped"), "--cap", "3"]) == 0
    assert int(Engine.load(tmp_path / "capped" / "index").index.lengths.max()) == 3
    assert main(["item-codes", "--data", "synthetic", "--out", str(tmp_path / "filter"), "--cap", "8", "--scores",
                 "graph-filter", "--graph-filter-grid", "0:0", "0.1:16"]) == 0
    filtered = json.loads((tmp_path / "filter" / "metrics.json").read_text())
    assert filtered["scores"] == "graph-filter" and len(filtered["grid"]) == 4 and filtered["cap"] == 8
    best = max(filtered["grid"], key=lambda p: p["valid_recall@20"])
    assert (filtered["alpha"], filtered["vectors"], filtered["keep"]) == (best["alpha"], best["vectors"], best["keep"])
    assert filtered["metrics"]["recall@20"] > 0 and (tmp_path / "filter" / "queries.parquet").is_file()
    assert main(["item-codes", "--data", "synthetic", "--out", str(tmp_path / "screened"), "--scores", "graph-filter",
                 "--graph-filter-grid", "0.1:16"]) == 0  # no cap given: the caps are screened on validation too
    screened = json.loads((tmp_path / "screened" / "metrics.json").read_text())
    assert sorted({p["cap"] for p in screened["grid"]}) == [8, 24, 80, 240]  # 1%, 3%, 10%, 30% of 800 items
    best = max(screened["grid"], key=lambda p: (p["valid_recall@20"], -p["cap"]))
    assert (screened["cap"], screened["keep"]) == (best["cap"], best["keep"])
    assert int(Engine.load(tmp_path / "screened" / "index").index.lengths.max()) <= best["cap"]
    assert main(["item-codes", "--data", "synthetic", "--out", str(tmp_path / "caps"), "--scores", "graph-filter",
                 "--graph-filter-grid", "0.1:16", "--cap", "40", "3"]) == 0  # the given caps are screened instead
    given = json.loads((tmp_path / "caps" / "metrics.json").read_text())
    assert sorted({p["cap"] for p in given["grid"]}) == [3, 40]
    best = max(given["grid"], key=lambda p: (p["valid_recall@20"], -p["cap"]))
    assert given["cap"] == best["cap"] and int(Engine.load(tmp_path / "caps" / "index").index.lengths.max()) <= best["cap"]
    for flags, message in ((["--cap-density", "0"], "--cap-density: expected a fraction in (0, 1]"),
                           (["--cap", "0"], "--cap: expected positive numbers of items"),
                           (["--cap", "3", "40"], "--cap: several caps are screened on validation with --scores "
                                                  "graph-filter only"),
                           (["--scores", "graph-filter", "--graph-filter-grid", "0.3"],
                            "--graph-filter-grid: expected ALPHA:VECTORS[:EASE]"),
                           (["--l2", "-1"], "--l2: expected a positive number")):
        assert main(["item-codes", "--data", "synthetic", "--out", str(tmp_path / "x"), *flags]) == 2
        assert message in capsys.readouterr().err
