"""The neighbour fit: EASE exactly when every item is every item's regressor, each item's
regressors and co-occurrence lists against a brute-force count, each column against a
numpy solve of its own restricted problem, and the columns' index against the dense rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparcode.engine import Engine
from sparcode.training.data import CSR
from sparcode.training.item_codes import item_code_index, item_scores, ridge
from sparcode.training.neighbour_fit import (
    DEGREE_POWER,
    LOOKUP_FACTOR,
    _cholesky_with_more_ridge,
    columns_index,
    neighbour_columns,
    neighbour_lists,
)


def random_train(n_users: int, n_items: int, seed: int, per_user: tuple[int, int]) -> CSR:
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, n_items + 1) ** 0.8  # popular and rare items, so lists differ from a plain count
    return CSR.from_lists([np.sort(rng.choice(n_items, size=rng.integers(*per_user), replace=False, p=p / p.sum()))
                           for _ in range(n_users)])


def gram(train: CSR, n_items: int) -> np.ndarray:
    x = np.zeros((len(train.indptr) - 1, n_items))
    for u in range(x.shape[0]):
        x[u, train.row(u)] = 1
    return x.T @ x


def dense_b(ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    b = np.zeros((ids.shape[0], ids.shape[0]))
    for i, j in zip(*np.nonzero(ids >= 0)):
        b[ids[i, j], i] = weights[i, j]
    return b


def test_every_item_as_regressor_is_ease_exactly():
    train = random_train(80, 12, seed=0, per_user=(4, 10))
    assert (gram(train, 12) > 0).all()  # every pair co-occurs, so every other item is a neighbour
    ids, weights = neighbour_columns(train, 12, neighbours=11, dtype=torch.float64, l2_scale=0.5)
    want = item_scores(train, 12, l2_scale=0.5, dtype=torch.float64).numpy()
    np.testing.assert_allclose(dense_b(ids, weights), want, rtol=1e-5, atol=1e-7)


def test_the_lists_hold_each_items_top_regressors_and_co_occurrences():
    n = 60
    train = random_train(200, n, seed=1, per_user=(1, 9))
    g = gram(train, n)
    lists = neighbour_lists(train, n, 5)
    np.testing.assert_array_equal(lists.degree, np.diag(g))
    for i in range(n):
        others = np.array([j for j in range(n) if j != i and g[i, j] > 0])
        score = g[i, others] / np.maximum(np.diag(g)[others], 1) ** DEGREE_POWER
        order = others[np.lexsort((others, -score))]  # best first, ties to the lower id
        chosen = lists.ids[i][lists.ids[i] >= 0]
        np.testing.assert_array_equal(chosen, order[:5])
        np.testing.assert_array_equal(lists.counts[i, : chosen.size], g[i, chosen])
        by_count = others[np.lexsort((others, -g[i, others]))][: 5 * LOOKUP_FACTOR]
        row = slice(lists.indptr[i], lists.indptr[i + 1])
        np.testing.assert_array_equal(lists.items[row], np.sort(by_count))
        np.testing.assert_array_equal(lists.item_counts[row], g[i, np.sort(by_count)])


@pytest.mark.parametrize("m, batch", [(4, None), (4, 7), (40, 5)])
def test_each_column_solves_its_items_regression_on_its_neighbours(m, batch):
    """The reference builds G[S_i, S_i] from the brute-force Gram, keeping an entry when
    either item's list (top LOOKUP_FACTOR x M by count) holds the other. At M = 40 items
    have from a few to 40 regressors: systems of 16, 32 and 40 are solved."""
    n = 70
    train = random_train(150 if m == 4 else 40, n, seed=2, per_user=(1, 12))
    g = gram(train, n)
    lam = ridge(train, n, 2.0)
    ids, weights = neighbour_columns(train, n, neighbours=m, l2_scale=2.0, dtype=torch.float64, batch=batch)
    lists = neighbour_lists(train, n, m)
    listed = np.zeros((n, n), dtype=bool)
    for a in range(n):
        listed[a, lists.items[lists.indptr[a] : lists.indptr[a + 1]]] = True
    known = listed | listed.T
    truncated = 0
    for i in range(n):
        s = ids[i][ids[i] >= 0]
        sub = np.where(known[np.ix_(s, s)], g[np.ix_(s, s)], 0.0)
        truncated += int((sub != g[np.ix_(s, s)]).sum())
        np.fill_diagonal(sub, np.diag(g)[s] + lam)
        np.testing.assert_allclose(weights[i, : s.size], np.linalg.solve(sub, g[s, i]), rtol=1e-4, atol=1e-6)
        assert (weights[i, s.size :] == 0).all()
    if m == 4:
        assert truncated > 0  # the case where the lists do not hold every entry is exercised
    else:
        sizes = (ids >= 0).sum(1)
        assert sizes.min() < 16 and ((sizes > 16) & (sizes <= 32)).any() and sizes.max() > 32


@pytest.mark.parametrize("keep", ["magnitude", "positive"])
def test_the_columns_index_is_the_dense_rows_index(keep):
    n = 50
    train = random_train(120, n, seed=3, per_user=(1, 10))
    ids, weights = neighbour_columns(train, n, neighbours=8)
    got = columns_index(ids, weights, n, 3, keep)
    want = item_code_index(torch.from_numpy(dense_b(ids, weights).astype(np.float32)), 3, keep=keep)
    for name in ("indptr", "items", "scores"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name))


def test_the_columns_index_drops_exact_zeros_and_keeps_only_positive_weights_when_asked():
    ids = np.array([[1, 2], [0, 2], [0, 1]])  # item i's regressors; code h lists the items with h among them
    weights = np.array([[0.0, -0.5], [0.25, 0.0], [-1.0, 2.0]])
    positive = columns_index(ids, weights, 3, 2, "positive")
    assert positive.indptr.tolist() == [0, 1, 2, 2]  # code 0: item 1; code 1: item 2; code 2: nothing positive
    assert positive.items.tolist() == [1, 2] and positive.scores.tolist() == [0.25, 2.0]
    magnitude = columns_index(ids, weights, 3, 2, "magnitude")
    assert magnitude.indptr.tolist() == [0, 2, 3, 4]  # the two exact zeros are dropped
    assert magnitude.items.tolist() == [1, 2, 2, 0] and magnitude.scores.tolist() == [0.25, -1.0, 2.0, -0.5]


def test_an_indefinite_matrix_gets_ridge_until_it_factors():
    a = torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)  # eigenvalues 3, -1
    factor = _cholesky_with_more_ridge(a, 0.6)  # + 0.6 I leaves eigenvalue -0.4; + 1.2 I factors, the same for both
    torch.testing.assert_close(factor @ factor.mT, a + 1.2 * torch.eye(2, dtype=torch.float64))


def test_bad_arguments_are_named():
    train = random_train(10, 6, seed=4, per_user=(1, 4))
    with pytest.raises(ValueError, match="neighbours: expected a positive int"):
        neighbour_lists(train, 6, 0)
    with pytest.raises(ValueError, match="batch: expected a positive int"):
        neighbour_columns(train, 6, batch=0)
    ids, weights = neighbour_columns(train, 6, neighbours=2)
    with pytest.raises(ValueError, match="cap: expected a positive int"):
        columns_index(ids, weights, 6, 0)
    with pytest.raises(ValueError, match="keep: expected one of"):
        columns_index(ids, weights, 6, 2, "largest")
    with pytest.raises(ValueError, match="ids, weights: expected two"):
        columns_index(ids[:3], weights[:3], 6, 2)


def test_item_codes_command_fits_by_neighbours(tmp_path, capsys):
    from sparcode.cli import main

    out = tmp_path / "items"
    assert main(["item-codes", "--data", "synthetic", "--out", str(out), "--cap", "8", "--fit", "neighbours",
                 "--neighbours", "16", "--no-progress"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["fit"] == "neighbours" and report["neighbours"] == 16 and report["metrics"]["recall@20"] > 0
    assert int(Engine.load(out / "index").index.lengths.max()) <= 8
    assert main(["item-codes", "--data", "synthetic", "--out", str(tmp_path / "auto"), "--cap", "8"]) == 0
    assert json.loads((tmp_path / "auto" / "metrics.json").read_text())["fit"] == "exact"  # 2,000 x 800 fits
    capsys.readouterr()
    assert main(["item-codes", "--data", "synthetic", "--out", str(tmp_path / "x"), "--fit", "neighbours",
                 "--neighbours", "0"]) == 2
    assert "--neighbours: expected a positive number of items" in capsys.readouterr().err


@pytest.mark.slow
def test_two_gloo_ranks_write_the_index_of_one(tmp_path, capsys):
    import subprocess
    import sys

    from sparcode.cli import main

    flags = ["item-codes", "--data", "synthetic", "--cap", "8", "--fit", "neighbours", "--neighbours", "24", "--no-progress"]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29521",
                "-m", "sparcode.cli", *flags, "--out", str(tmp_path / "two"), "--shard-items"]
    proc = subprocess.run(launcher, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (Engine.load(tmp_path / name / "index").index for name in ("one", "two"))
    for name in ("indptr", "items", "scores"):
        assert torch.equal(getattr(one, name), getattr(two, name))
    capsys.readouterr()
    assert main([*flags, "--out", str(tmp_path / "x"), "--shard-items"]) == 2
    assert "--shard-items: needs torchrun" in capsys.readouterr().err
    assert main([*flags[:5], "--out", str(tmp_path / "x"), "--shard-items"]) == 2
    assert "--shard-items: shards the neighbour fit; add --fit neighbours" in capsys.readouterr().err


def test_the_default_cap_is_one_percent_up_to_the_item_count_cap():
    from sparcode.training import defaults
    from sparcode.training.commands import code_cap

    assert code_cap(800) == 8 and code_cap(40_981) == 410  # 1% of the catalogue
    assert code_cap(1_000_000) == defaults.ITEM_CODES_CAP == 500  # not 10,000
    assert code_cap(1_000_000, density=0.01) == 10_000 and code_cap(1_000_000, cap=7) == 7
