"""Evaluation, the code behind every published Recall@K: metrics against hand-computed
cases and an independent brute-force reference, ranking with training items excluded,
and evaluate_engine / evaluate_exact against the same metrics computed from dense scores."""

import math

import numpy as np
import pytest
import torch
from oracle import dense_scores

from sparcode.engine import Engine
from sparcode.training import data as datasets
from sparcode.training.data import CSR
from sparcode.training.evaluate import encode_users, evaluate_engine, evaluate_exact, seen_items
from sparcode.training.export import export_index
from sparcode.training.metrics import ranking_metrics
from sparcode.training.models import SparCode, TwoTower
from sparcode.training.train import TrainConfig, full_scores, rank_excluding, tensors, validator

KS = (1, 2, 3, 5)


def reference_metrics(ranked: list[list[int]], truth: list[list[int]], ks=KS) -> dict[str, float]:
    """BARS's definitions, written out one user and one position at a time."""
    totals: dict[str, float] = {}
    counted = 0
    for row, relevant in zip(ranked, truth):
        if not relevant:
            continue
        counted += 1
        for k in ks:
            top = row[:k]
            hits = [1 if item in relevant else 0 for item in top]
            dcg = sum(h / math.log2(position + 2) for position, h in enumerate(hits))
            idcg = sum(1 / math.log2(position + 2) for position in range(min(len(relevant), k)))
            values = {"recall": sum(hits) / len(relevant), "precision": sum(hits) / k, "hitrate": float(any(hits)),
                      "ndcg": dcg / idcg}
            for name, value in values.items():
                totals[f"{name}@{k}"] = totals.get(f"{name}@{k}", 0.0) + value
    return {name: value / max(counted, 1) for name, value in totals.items()} | {"users": counted}


def ranked_by_dense(scores: np.ndarray, excluded: list[np.ndarray], k: int) -> list[list[int]]:
    """Each row's top k by (score desc, item asc) over the finite scores, excluded items left out."""
    out = []
    for row, leave_out in zip(scores, excluded):
        row = row.astype(np.float64).copy()
        row[np.asarray(leave_out, dtype=np.int64)] = -np.inf
        order = sorted((i for i in range(row.size) if np.isfinite(row[i])), key=lambda i: (-row[i], i))
        out.append(order[:k])
    return out


def already_seen(data) -> list[list[int]]:
    """Each user's train and validation items, read straight from the CSR arrays (not
    through ``seen_items``, which is under test)."""
    def row(csr, u):
        return [int(i) for i in csr.items[csr.indptr[u] : csr.indptr[u + 1]]]

    return [row(data.train, u) + row(data.valid, u) for u in range(data.n_users)]


def test_metrics_by_hand():
    # user 0: |test| = 3 > K = 2 (the ideal DCG is clipped to 2 positions); user 1: |test| = 1;
    # user 2: no test items (not counted); user 3: a hit at rank 3 only
    test = CSR.from_lists([np.array([4, 7, 9]), np.array([2]), np.array([], dtype=np.int64), np.array([8, 1])])
    ranked = np.array([[4, 7, 0, 9, 5], [3, 2, 5, 6, 7], [1, 2, 3, 4, 5], [0, 5, 8, -1, -1]])
    m = ranking_metrics(ranked, test, np.arange(4), ks=(2, 3))
    assert m["users"] == 3
    assert m["recall@2"] == pytest.approx((2 / 3 + 1 / 1 + 0) / 3)
    assert m["precision@2"] == pytest.approx((2 / 2 + 1 / 2 + 0) / 3)
    assert m["hitrate@2"] == pytest.approx(2 / 3)
    user0 = (1 + 1 / math.log2(3)) / (1 + 1 / math.log2(3))  # both hits in the first 2: ideal over 2, not 3
    user1 = (1 / math.log2(3)) / 1.0
    assert m["ndcg@2"] == pytest.approx((user0 + user1 + 0) / 3)
    user0_3 = (1 + 1 / math.log2(3)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    user3_3 = (1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["ndcg@3"] == pytest.approx((user0_3 + user1 + user3_3) / 3)
    assert m["recall@3"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert m["precision@3"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert m["hitrate@3"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_the_reference_at_every_cutoff(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, width = 40, 30, 5
    truth = [list(rng.choice(n_items, size=int(rng.integers(0, 9)), replace=False)) for _ in range(n_users)]
    ranked = [list(rng.choice(n_items, size=width, replace=False)) for _ in range(n_users)]
    ranked[0] = ranked[0][:2] + [-1] * 3  # fewer than K results
    got = ranking_metrics(np.array(ranked), CSR.from_lists([np.array(t, dtype=np.int64) for t in truth]),
                          np.arange(n_users), ks=KS)
    want = reference_metrics(ranked, truth)
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name]), name


def test_rank_excluding_leaves_out_training_items_and_orders_by_score():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.3, 0.95],
                           [0.2, 0.2, 0.6, 0.1, 0.6, 0.0],
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])
    train = CSR.from_lists([np.array([5, 0]), np.array([2]), np.array([], dtype=np.int64)])
    valid = CSR.from_lists([np.array([3]), np.array([], dtype=np.int64), np.array([0])])
    users = np.array([0, 1, 2])
    assert rank_excluding(scores, users, [train], 3).tolist()[0] == [2, 3, 4]
    ranked = rank_excluding(scores, users, [train, valid], 3)
    assert ranked[0].tolist() == [2, 4, 1]
    assert ranked[1][0] == 4 and set(ranked[1][1:].tolist()) == {0, 1}  # 0 and 1 tie at 0.2
    assert ranked[2].tolist() == [1, 2, 3]
    assert torch.equal(scores[0], torch.tensor([0.9, 0.1, 0.8, 0.7, 0.3, 0.95]))  # the caller's scores untouched
    rows = np.array([2, 0])  # users in any order: each row uses its own user's items
    assert rank_excluding(scores[[2, 0]], rows, [train, valid], 2).tolist() == [[1, 2], [2, 4]]


@pytest.fixture(scope="module")
def trained():
    """A small SparCode and TwoTower with non-trivial weights, and their data."""
    torch.manual_seed(0)
    data = datasets.synthetic(120, 90, per_user=10, seed=1)
    sparcode = SparCode(data, n_words=4, hidden=(16,), bias=-0.05)
    torch.nn.init.normal_(sparcode.scorer.rest[-1].weight, std=0.5)
    cfg = TrainConfig(progress=False)
    t = tensors(data, cfg)
    sparcode.train()
    with torch.no_grad():
        sparcode.tokens(t["history"], t["user_features"])  # codebooks from the users' tokens
    two_tower = TwoTower(data)
    return data, sparcode.eval(), two_tower.eval(), cfg


def test_evaluate_engine_equals_metrics_of_the_dense_index_scores(trained):
    data, model, _, cfg = trained
    index, _ = export_index(model, tensors(data, cfg)["item_features"], data.n_items, density=0.3)
    codes = encode_users(model, data, cfg)
    k = 50
    got = evaluate_engine(Engine(index, model.encoder, backend="torch"), codes, data, k=k)
    dense = np.nan_to_num(dense_scores(index, codes), nan=-np.inf)  # non-candidates are never returned
    seen = already_seen(data)
    assert sum(map(len, seen)) > 0 and sum(len(data.valid.row(u)) for u in range(data.n_users)) > 0
    assert [sorted(x.tolist()) for x in seen_items(data)] == [sorted(x) for x in seen]
    ranked = ranked_by_dense(dense, seen, k)
    want = reference_metrics(ranked, [list(data.test.row(u)) for u in range(data.n_users)], ks=(10, 20, 50))
    assert got["users"] == want["users"] > 0
    for name in ("recall@20", "ndcg@20", "recall@50", "precision@10", "hitrate@50"):
        assert got[name] == pytest.approx(want[name]), name
    assert got["recall@50"] > 0  # the case is not vacuous


@pytest.mark.parametrize("kind", ["two_tower", "sparcode"])
def test_evaluate_exact_equals_metrics_of_the_full_scores(trained, kind):
    data, sparcode, two_tower, cfg = trained
    model = two_tower if kind == "two_tower" else sparcode
    k = 50
    got = evaluate_exact(model, data, cfg, k=k)
    users = np.arange(data.n_users)
    scores = full_scores(model, data, cfg, users, tensors(data, cfg)).numpy()
    ranked = ranked_by_dense(scores, already_seen(data), k)
    want = reference_metrics(ranked, [list(data.test.row(u)) for u in users], ks=(10, 20, 50))
    assert got["users"] == want["users"]
    for name in ("recall@10", "recall@20", "ndcg@20", "recall@50", "ndcg@50", "precision@20", "hitrate@20"):
        assert got[name] == pytest.approx(want[name], abs=2e-3), name  # ties may order differently in topk
    sample = evaluate_exact(model, data, cfg, sample=30, seed=3, k=k)
    picked = np.sort(np.random.default_rng(3).choice(users, size=30, replace=False))
    want = reference_metrics([ranked[u] for u in picked], [list(data.test.row(u)) for u in picked], ks=(20,))
    assert sample["sample_users"] == 30 and sample["recall@20"] == pytest.approx(want["recall@20"], abs=2e-3)


def test_validation_split_ranks_train_excluded_and_scores_validation_items(trained):
    data, model, _, cfg = trained
    index, _ = export_index(model, tensors(data, cfg)["item_features"], data.n_items, density=0.3)
    codes = encode_users(model, data, cfg)
    got = evaluate_engine(Engine(index, model.encoder, backend="torch"), codes, data, k=50, split="valid")
    users = [u for u in range(data.n_users) if data.valid.indptr[u + 1] > data.valid.indptr[u]]
    train = [data.train.items[data.train.indptr[u] : data.train.indptr[u + 1]] for u in users]
    truth = [list(data.valid.items[data.valid.indptr[u] : data.valid.indptr[u + 1]]) for u in users]
    assert 0 < len(users) < data.n_users and sum(map(len, train)) > 0
    dense = np.nan_to_num(dense_scores(index, codes[users]), nan=-np.inf)
    want = reference_metrics(ranked_by_dense(dense, train, 50), truth, ks=(10, 20, 50))
    assert got["users"] == want["users"] == len(users)
    for name in ("recall@20", "ndcg@20", "recall@50", "hitrate@10"):
        assert got[name] == pytest.approx(want[name]), name
    assert got["recall@50"] > 0


def test_early_stopping_validation_excludes_train_items_only(trained):
    data, _, two_tower, cfg = trained
    users = np.nonzero(data.valid.lengths > 0)[0]
    got = validator(data, cfg)(two_tower, users, data.valid)
    scores = full_scores(two_tower, data, cfg, users, tensors(data, cfg)).numpy()
    train = [data.train.items[data.train.indptr[u] : data.train.indptr[u + 1]] for u in users]
    truth = [list(data.valid.items[data.valid.indptr[u] : data.valid.indptr[u + 1]]) for u in users]
    want = reference_metrics(ranked_by_dense(scores, train, 20), truth, ks=(20,))
    assert got["users"] == want["users"] == len(users) > 0
    assert got["recall@20"] == pytest.approx(want["recall@20"], abs=2e-3) and want["recall@20"] > 0


def test_users_without_test_items_are_not_counted():
    test = CSR.from_lists([np.array([], dtype=np.int64), np.array([1])])
    m = ranking_metrics(np.array([[1, 2], [1, 2]]), test, np.array([0, 1]), ks=(2,))
    assert m["users"] == 1 and m["recall@2"] == 1.0 and m["precision@2"] == 0.5
    empty = ranking_metrics(np.array([[1, 2]]), CSR.from_lists([np.array([], dtype=np.int64)]), np.array([0]), ks=(2,))
    assert empty["users"] == 0 and empty["recall@2"] == 0.0
