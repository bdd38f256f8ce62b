"""The dense-row regime of the numba backend: the same results as the dense oracle and the
posting path, bit for bit, within its memory budget, and chosen only where it pays."""

import numpy as np
import pytest
import torch
from helpers import csr_index, quantized_index
from oracle import assert_same_results, dense_search

from sparcode.engine import Engine
from sparcode.engine.bags import Bags
from sparcode.engine.dense import build_rows, dense_budget, rows_bytes
from sparcode.engine.numba_backend import NumbaBackend, choose_regime
from sparcode.engine.synthetic import random_codes


def engine(index, regime="cpu-dense", dense_bytes=None):
    eng = Engine(index, backend="numba")
    eng.backend = NumbaBackend(dense_bytes=dense_bytes, regime=regime)
    return eng


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_dense_matches_the_oracle_exactly(dtype, seed):
    rng = np.random.default_rng(seed)
    negative = seed % 2 == 1  # zero and negative scores: absent pairs are NaN, not 0
    index = quantized_index(24, 137, 40, seed=seed, dtype=dtype, negative=negative)  # 137: no tile multiple
    codes = random_codes(9, 5, 24, seed=seed + 5)
    codes[0] = codes[0, 0]  # one query repeats a single code
    exclude = [rng.choice(137, size=int(rng.integers(0, 30)), replace=False) for _ in range(9)]
    exclude[1] = np.arange(137)  # every item excluded
    for k in (1, 10, 300):  # 300: more than any query's candidates
        got = engine(index).search(codes, k=k, exclude=exclude)
        assert_same_results(got.scores, got.ids, *dense_search(index, codes.numpy(), k, exclude))
        posting = engine(index, "cpu-accumulate").search(codes, k=k, exclude=exclude)
        assert torch.equal(got.ids, posting.ids) and torch.equal(got.scores, posting.scores)
    assert (got.ids[1] == -1).all()


def test_dense_edge_cases():
    # code 1 is empty; query 2 has only empty lists; a zero score is still a candidate
    index = csr_index([[(0, 1.0), (5, 0.0), (9, -0.5)], [], [(5, 1.0), (6, 3.0)]], n_items=10)
    codes = torch.tensor([[0, 0, 2], [2, 1, 0], [1, 1, 1]])
    got = engine(index).search(codes, k=5)
    assert got.ids.tolist() == [[6, 0, 5, 9, -1], [6, 0, 5, 9, -1], [-1] * 5]
    assert got.scores[0, :4].tolist() == [3.0, 2.0, 1.0, -1.0]
    empty = engine(index).search(torch.empty((0, 3), dtype=torch.int64), k=4)
    assert empty.ids.shape == (0, 4)
    one = engine(index).search(torch.tensor([[2]]), k=1)
    assert one.ids.tolist() == [[6]]


def test_absent_pairs_are_nan_or_zero():
    index = csr_index([[(1, 2.0)], [(0, -1.0), (2, 0.0)]], n_items=3)
    rows = build_rows(index, torch.float32)
    assert torch.isnan(rows[0, 0]) and rows[0, 1] == 2.0 and rows[1, 2] == 0.0 and rows[1, 0] == -1.0
    assert build_rows(index, torch.float16, absent=0.0)[0, 0] == 0.0


def test_dense_rows_respect_their_budget_and_fall_back():
    index = quantized_index(16, 400, 300, seed=1)  # queries touch most items: dense pays
    codes = random_codes(8, 6, 16, seed=2)
    need = rows_bytes(index, torch.float32)
    assert need == 16 * 400 * 4
    small = engine(index, "auto", dense_bytes=need - 1)
    assert small.backend.plan(index, Bags.dense(codes), 10).regime == "cpu-accumulate"
    small.search(codes, k=10)
    assert not any(isinstance(n, tuple) and n[0] == "dense_rows" for n in index.derived_names())  # nothing built
    big = engine(index, "auto", dense_bytes=need)
    assert big.backend.plan(index, Bags.dense(codes), 10).regime == "cpu-dense"
    got = big.search(codes, k=10)
    assert any(isinstance(n, tuple) and n[0] == "dense_rows" for n in index.derived_names())
    assert index.nbytes >= need  # the rows count in the index's memory
    assert torch.equal(got.ids, small.search(codes, k=10).ids)
    assert engine(index, "auto", dense_bytes=0).backend.plan(index, Bags.dense(codes), 10).regime == "cpu-accumulate"
    assert dense_budget(index, None) > 0 and dense_budget(index, 123) == 123
    with pytest.raises(ValueError, match="dense_bytes: expected an int >= 0"):
        Engine(index, backend="numba", dense_bytes=-1)
    with pytest.raises(ValueError, match="regime: expected one of"):
        NumbaBackend(regime="tiled")


def test_regime_choice_follows_the_cost_model():
    assert choose_regime(100_000, 8, 73_000) == "cpu-dense"  # R2 at CPU scale: 73% of N per query
    assert choose_regime(100_000, 4, 1_200) == "cpu-accumulate"  # R1 at CPU scale
    assert choose_regime(1_000_000, 4, 58_000) == "cpu-accumulate"  # R3 at CPU scale
