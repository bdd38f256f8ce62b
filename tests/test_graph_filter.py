"""Graph-filter codes against the GF-CF formula computed densely in float64 with numpy."""

import numpy as np
import pytest
import torch

from sparcode.engine import Engine
from sparcode.training.data import CSR
from sparcode.training.graph_filter import filter_rows, graph_filter_index
from sparcode.training.item_codes import history_bags


def random_train(n_users: int, n_items: int, seed: int) -> CSR:
    rng = np.random.default_rng(seed)
    return CSR.from_lists([np.sort(rng.choice(n_items, size=rng.integers(1, 9), replace=False)) for _ in range(n_users)])


def dense_filter(train: CSR, n_items: int, alpha: float, vectors: int) -> np.ndarray:
    """s = r (R~^T R~ + alpha D^-1/2 V V^T D^1/2), built from the definitions."""
    r = np.zeros((len(train.indptr) - 1, n_items))
    for u in range(r.shape[0]):
        r[u, train.row(u)] = 1.0
    du, di = np.maximum(r.sum(1), 1), np.maximum(r.sum(0), 1)
    norm = r / np.sqrt(du)[:, None] / np.sqrt(di)[None, :]
    out = norm.T @ norm
    if alpha and vectors:
        v = np.linalg.svd(norm)[2][:vectors].T
        out += alpha * (v / np.sqrt(di)[:, None]) @ (v.T * np.sqrt(di)[None, :])
    return out


@pytest.mark.parametrize(("alpha", "vectors"), [(0.0, 0), (0.3, 4), (1.0, 6)])
def test_filter_rows_are_the_gf_cf_matrix(alpha, vectors):
    train = random_train(40, 25, seed=1)
    want = dense_filter(train, 25, alpha, vectors)
    got = torch.cat(list(filter_rows(train, 25, alpha=alpha, vectors=vectors, rows=7))).double().numpy()
    assert got.shape == (25, 25)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_graph_filter_index_keeps_each_codes_top_scores_and_serves_the_filter():
    n_users, n_items, cap, k = 40, 25, 6, 5
    train = random_train(n_users, n_items, seed=2)
    dense = dense_filter(train, n_items, 0.3, 4)
    index = graph_filter_index(train, n_items, cap, alpha=0.3, vectors=4)
    assert index.n_codes == index.n_items == n_items
    for code in range(n_items):
        lo, hi = int(index.indptr[code]), int(index.indptr[code + 1])
        best = set(np.argsort(-dense[code])[:cap].tolist()) & set(np.nonzero(dense[code] > 0)[0].tolist())
        assert set(index.items[lo:hi].tolist()) == best
    kept = np.zeros_like(dense)
    for code in range(n_items):
        lo, hi = int(index.indptr[code]), int(index.indptr[code + 1])
        kept[code, index.items[lo:hi].numpy()] = dense[code, index.items[lo:hi].numpy()]
    codes, offsets = history_bags(train)
    result = Engine(index).search(torch.from_numpy(codes), k=k, offsets=torch.from_numpy(offsets))
    for u in range(n_users):
        history = train.row(u)
        summed = kept[history].sum(0)
        candidate = (kept[history] != 0).any(0)
        expected = np.sort(summed[candidate])[::-1][:k]
        np.testing.assert_allclose(result.scores[u][: expected.size].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_ease_weights_add_to_the_filter_and_are_chosen_on_validation():
    from sparcode.training.data import synthetic
    from sparcode.training.graph_filter import fit_on_validation
    from sparcode.training.item_codes import item_scores

    train = random_train(40, 25, seed=4)
    ease = item_scores(train, 25)
    plain = torch.cat(list(filter_rows(train, 25, alpha=0.3, vectors=4, rows=8)))
    summed = torch.cat(list(filter_rows(train, 25, alpha=0.3, vectors=4, rows=8, ease=ease, ease_weight=2.0)))
    torch.testing.assert_close(summed, plain + 2.0 * ease)
    with pytest.raises(ValueError, match="ease_weight: expected a weight >= 0 with the EASE matrix"):
        list(filter_rows(train, 25, ease_weight=1.0))
    data = synthetic(300, 100, seed=1)
    index, best, grid = fit_on_validation(data, 10, [(0.0, 0, 0.0), (0.3, 8, 1.0)], keeps=("positive", "magnitude"))
    assert [(p["ease_weight"], p["keep"]) for p in grid] == [(0.0, "positive"), (0.0, "magnitude"),
                                                           (1.0, "positive"), (1.0, "magnitude")]
    assert best["valid_recall@20"] == max(p["valid_recall@20"] for p in grid) and index.n_codes == 100
    by_magnitude = [p for p in grid if p["keep"] == "magnitude"]
    assert by_magnitude[0]["valid_recall@20"] != by_magnitude[1]["valid_recall@20"]  # the grid is not vacuous


@pytest.mark.parametrize("keep", ["positive", "magnitude"])
def test_several_caps_from_one_pass_are_each_caps_own_index(keep):
    from sparcode.training.item_codes import rows_indexes

    train = random_train(60, 30, seed=5)
    rows = torch.cat(list(filter_rows(train, 30, alpha=0.3, vectors=4)))
    rows[0, :5] = 0.0  # exact zeros are never kept
    got = rows_indexes(iter(rows.split(7)), 30, (12, 3, 40), (keep,))
    assert sorted(got) == [(keep, 3), (keep, 12), (keep, 40)]
    dense = rows.numpy()
    for cap in (3, 12, 40):
        index = got[keep, cap]
        for h, row in enumerate(dense):  # each row's own ranking, built here row by row
            order = np.argsort(-(np.abs(row) if keep == "magnitude" else row), kind="stable")[:cap]
            want = sorted(int(i) for i in order if (row[i] != 0 if keep == "magnitude" else row[i] > 0))
            lo, hi = int(index.indptr[h]), int(index.indptr[h + 1])
            assert index.items[lo:hi].tolist() == want, (cap, h)
            np.testing.assert_allclose(index.scores[lo:hi].numpy(), row[want], rtol=1e-6)
    assert int(got[keep, 3].lengths.max()) == 3 and int(got[keep, 40].lengths.max()) <= 30


def test_caps_are_chosen_on_validation_ties_to_the_smaller_index():
    from sparcode.training.data import synthetic
    from sparcode.training.graph_filter import fit_on_validation, screened_caps

    assert screened_caps(1682) == [17, 50, 168, 500]  # 1%, 3%, 10% of N, and 30% held to 500 items per code
    assert screened_caps(50) == [1, 2, 5, 15] and screened_caps(3) == [1]
    data = synthetic(300, 100, seed=1)
    index, best, grid = fit_on_validation(data, [30, 3, 10], [(0.1, 8, 0.0)], keeps=["positive"])
    assert [p["cap"] for p in grid] == [3, 10, 30]
    top = max(p["valid_recall@20"] for p in grid)
    assert best["cap"] == min(p["cap"] for p in grid if p["valid_recall@20"] == top)
    assert int(index.lengths.max()) <= best["cap"] and grid[0]["valid_recall@20"] != grid[2]["valid_recall@20"]
    _, tied, grid = fit_on_validation(data, [200, 100], [(0.1, 8, 0.0)], keeps=["positive"])  # both keep all 100 items: a tie
    assert grid[0]["valid_recall@20"] == grid[1]["valid_recall@20"] and tied["cap"] == 100
    with pytest.raises(ValueError, match="caps: needs at least one"):
        fit_on_validation(data, [], [(0.1, 8, 0.0)])
    both = fit_on_validation(data, [3], [(0.1, 8, 0.0)])[2]  # the default screens both keep rules
    assert sorted(p["keep"] for p in both) == ["magnitude", "positive"]


def test_wide_split_holds_out_a_slice_of_every_users_training_items():
    from sparcode.training.data import screen_split, synthetic

    data = synthetic(4000, 60, seed=1)  # more users than the early-stopping split's 2,000
    data.train = CSR.from_lists([data.train.row(u)[: 3 if u % 7 == 0 else 10 + u % 15]  # some under 5 items
                                 for u in range(data.n_users)])
    wide = screen_split(data, "wide", seed=3)
    held_users = 0
    for u in range(data.n_users):
        train, kept, held = data.train.row(u), wide.train.row(u), wide.valid.row(u)
        known = train.tolist() + data.valid.row(u).tolist()
        assert sorted(kept.tolist() + held.tolist()) == sorted(known)  # a partition of the user's known items
        assert set(held.tolist()) <= set(train.tolist())  # held out of the training items
        assert kept.size >= 1 and (held.size == 0 if train.size < 5 else True)
        held_users += held.size > 0
    eligible = int((data.train.lengths >= 5).sum())
    assert held_users > max(2000, int((data.valid.lengths > 0).sum())) and held_users <= eligible
    assert 0.05 < wide.valid.items.size / data.train.items[data.train.lengths.repeat(data.train.lengths) >= 5].size < 0.15
    assert wide.test is data.test and wide.n_items == data.n_items
    np.testing.assert_array_equal(screen_split(data, "wide", seed=3).valid.items, wide.valid.items)  # seeded
    assert not np.array_equal(screen_split(data, "wide", seed=4).valid.indptr, wide.valid.indptr)


def test_wide_folds_are_disjoint_slices_of_one_draw():
    from sparcode.training.data import screen_split, synthetic
    from sparcode.training.graph_filter import fit_on_validation

    data = synthetic(300, 100, seed=1)
    folds = [screen_split(data, "wide", seed=3, fold=f) for f in range(10)]
    np.testing.assert_array_equal(folds[0].valid.items, screen_split(data, "wide", seed=3).valid.items)
    for u in range(0, data.n_users, 7):
        held = [fold.valid.row(u).tolist() for fold in folds]
        assert sorted(sum(held, [])) == sorted(data.train.row(u).tolist())  # ten folds: each item held once
        for fold, items in zip(folds, held):
            known = data.train.row(u).tolist() + data.valid.row(u).tolist()
            assert sorted(fold.train.row(u).tolist() + items) == sorted(known)
    with pytest.raises(ValueError, match="fold: expected 0 <= fold x fraction < 1"):
        screen_split(data, "wide", fold=10)
    with pytest.raises(ValueError, match="rule: expected 'wide' or 'tail' \\(one fold\\)"):
        screen_split(data, "tail", fold=1)
    grid = [(0.0, 0, 0.0), (0.3, 8, 0.0)]
    _, one, single = fit_on_validation(data, 10, grid, keeps=["positive"], split="wide", seed=3, folds=1)
    _, two, double = fit_on_validation(data, 10, grid, keeps=["positive"], split="wide", seed=3, folds=2)
    assert one["folds"] == 1 and two["folds"] == 2 and single != double
    assert [p["valid_recall@20"] for p in single] != [p["valid_recall@20"] for p in double]  # the second slice counts
    _, tail, _ = fit_on_validation(data, 10, grid, keeps=["positive"], split="tail", folds=5)
    assert tail["folds"] == 1  # the tail is one slice
    for bad in (0, 11, True, 2.0):
        with pytest.raises(ValueError, match="folds: expected an int from 1 to 10"):
            fit_on_validation(data, 10, grid, folds=bad)


def test_tail_split_holds_out_the_end_of_every_users_list():
    from sparcode.training.data import screen_split, synthetic

    data = synthetic(300, 100, seed=1)
    data.train = CSR.from_lists([data.train.row(u)[: 3 + u % 30] for u in range(data.n_users)])
    tail = screen_split(data, "tail", seed=5)
    for u in range(data.n_users):
        items = data.train.row(u)
        held = 0 if items.size < 5 else max(1, int(np.floor(0.1 * items.size + 0.5)))  # 10%, rounded, at least 1
        np.testing.assert_array_equal(tail.train.row(u), np.concatenate([items[: items.size - held], data.valid.row(u)]))
        np.testing.assert_array_equal(tail.valid.row(u), items[items.size - held :])
    assert tail.valid.lengths.max() >= 2 and (tail.valid.lengths > 0).sum() == (data.train.lengths >= 5).sum()
    small = screen_split(data, "tail", fraction=0.05)  # 5% of a short list rounds to none: one item is held
    assert ((small.valid.lengths >= 1) == (data.train.lengths >= 5)).all()
    with pytest.raises(ValueError, match="rule: expected 'wide' or 'tail'"):
        screen_split(data, "valid")


@pytest.mark.parametrize("split", ["wide", "tail"])
def test_a_screen_scores_its_own_split_and_serves_the_chosen_setting_refitted(split):
    from sparcode.training.data import screen_split, synthetic
    from sparcode.training.evaluate import evaluate_engine, seen_items
    from sparcode.training.graph_filter import fit_on_validation

    data = synthetic(300, 100, seed=1)
    grid = [(0.0, 0, 0.0), (0.3, 8, 0.0), (1.0, 16, 0.0)]
    index, best, scores = fit_on_validation(data, 10, grid, keeps=["positive"], split=split, seed=2, folds=3)
    slices = [screen_split(data, split, seed=2, fold=f) for f in range(3 if split == "wide" else 1)]
    for point in scores:  # each setting fitted without a slice's held-out items, scored on them, averaged
        want = []
        for held in slices:
            screened = graph_filter_index(held.train, 100, 10, alpha=point["alpha"], vectors=point["vectors"], seed=2)
            want.append(evaluate_engine(Engine(screened), history_bags(held.train), held, split="valid")["recall@20"])
        assert point["valid_recall@20"] == pytest.approx(np.mean(want))
    assert best["valid_recall@20"] == max(p["valid_recall@20"] for p in scores) and best["split"] == split
    assert best["folds"] == len(slices)
    assert len({p["valid_recall@20"] for p in scores}) > 1  # the screen is not vacuous

    def same(got, want):
        assert torch.equal(got.indptr, want.indptr) and torch.equal(got.items, want.items)
        torch.testing.assert_close(got.scores, want.scores)

    setting = {"alpha": best["alpha"], "vectors": best["vectors"], "keep": best["keep"], "seed": 2}
    same(index, graph_filter_index(data.train, 100, 10, **setting))  # served from the whole training split
    everything = CSR.from_lists(seen_items(data))
    index, best, narrow = fit_on_validation(data, 10, grid, keeps=["positive"], split="valid", seed=2, fit=everything)
    assert [p["valid_recall@20"] for p in narrow] != [p["valid_recall@20"] for p in scores]
    setting = {"alpha": best["alpha"], "vectors": best["vectors"], "keep": best["keep"], "seed": 2}
    same(index, graph_filter_index(everything, 100, 10, **setting))  # ``fit`` names what serves
    with pytest.raises(ValueError, match="split: expected one of"):
        fit_on_validation(data, 10, grid, split="test")


def test_auto_screens_the_tail_where_the_test_split_is_by_time_else_a_wide_slice():
    from dataclasses import replace

    from sparcode.training.data import synthetic
    from sparcode.training.graph_filter import fit_on_validation

    data = synthetic(300, 100, seed=1)
    grid = [(0.0, 0, 0.0), (0.3, 8, 0.0)]
    for test_by, rule in (("random", "wide"), ("time", "tail")):
        timed = replace(data, test_by=test_by)
        _, best, scores = fit_on_validation(timed, 10, grid, keeps=["positive"], split="auto")
        _, _, want = fit_on_validation(timed, 10, grid, keeps=["positive"], split=rule)
        assert best["split"] == rule and scores == [dict(p, fit_seconds=q["fit_seconds"]) for p, q in zip(want, scores)]


def test_bad_settings_name_the_argument():
    train = random_train(10, 8, seed=3)
    with pytest.raises(ValueError, match="alpha: expected a weight >= 0"):
        list(filter_rows(train, 8, alpha=-1.0))
    with pytest.raises(ValueError, match="vectors: expected an int >= 0"):
        list(filter_rows(train, 8, vectors=-2))
    with pytest.raises(ValueError, match="cap: expected a positive int"):
        graph_filter_index(train, 8, 0)


def test_accuracy_bench_picks_the_graph_filter_on_validation(tmp_path, capsys):
    import json

    from sparcode.bench import accuracy

    argv = ["--dataset", "synthetic", "--synthetic-size", "300", "100", "--out", str(tmp_path), "--models",
            "graph_filter", "--cap-density", "0.1", "--graph-filter-grid", "0:0", "0.3:8", "1:16", "--graph-filter-keeps",
            "positive", "magnitude", "--no-progress"]
    assert accuracy.main(argv) == 0
    report = json.loads((tmp_path / "accuracy-synthetic.json").read_text())
    entry = report["models"]["graph_filter"]
    grid = entry["grid"]
    assert [(p["alpha"], p["vectors"], p["keep"]) for p in grid] == [
        (a, v, keep) for a, v in [(0.0, 0), (0.3, 8), (1.0, 16)] for keep in ("positive", "magnitude")]
    best = max(grid, key=lambda p: p["valid_recall@20"])
    assert (entry["alpha"], entry["vectors"], entry["keep"]) == (best["alpha"], best["vectors"], best["keep"])
    assert entry["selected_on"] == "valid_recall@20" and entry["split"] == "wide"  # auto: synthetic's test is random
    assert report["config"]["model"]["graph_filter_split"] == "auto"
    assert entry["cap"] == 10 and entry["recall@20"] > 0
    assert report["config"]["model"]["graph_filter_grid"][1] == [0.3, 8, 0.0]
    with pytest.raises(SystemExit):
        accuracy.main([*argv[:-8], "--graph-filter-grid", "0.3", "--no-progress"])
    assert "--graph-filter-grid: expected ALPHA:VECTORS[:EASE]" in capsys.readouterr().err
    given = [*argv[:9], "--graph-filter-grid", "0.3:8", "--graph-filter-caps", "30", "2", "--no-progress"]
    assert accuracy.main(given) == 0  # the given caps are screened on validation in place of the default ones
    entry = json.loads((tmp_path / "accuracy-synthetic.json").read_text())["models"]["graph_filter"]
    assert entry["caps_screened"] == [2, 30] and sorted({p["cap"] for p in entry["grid"]}) == [2, 30]
    best = max(entry["grid"], key=lambda p: (p["valid_recall@20"], -p["cap"]))
    assert (entry["cap"], entry["keep"]) == (best["cap"], best["keep"])
    for flags, message in ((["--graph-filter-caps", "0"], "--graph-filter-caps: expected positive numbers"),
                           (["--graph-filter-caps", "5", "--cap-density", "0.1"], "not with --density or --cap-density")):
        with pytest.raises(SystemExit):
            accuracy.main([*given[:-4], *flags, "--no-progress"])
        assert message in capsys.readouterr().err
