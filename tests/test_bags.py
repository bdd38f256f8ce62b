"""Ragged, weighted bags of codes through ``Engine.search`` on every backend and regime,
against the numpy oracle (``oracle.bag_scores``), which never calls the engine."""

import numpy as np
import pytest
import torch
from helpers import DEVICE, csr_index, quantized_index
from oracle import assert_same_results, bag_scores, top_k

from sparcode.engine import Engine
from sparcode.engine.bags import Bags
from sparcode.engine.numba_backend import NumbaBackend
from sparcode.engine.selection import score_floor
from sparcode.engine.triton_backend import TritonBackend

# Weights whose products with the quantized scores (multiples of 1/8) and their sums stay
# exact in float32, so every backend must agree with the oracle bit for bit.
EXACT_WEIGHTS = np.array([-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0], dtype=np.float32)

ENGINES = {
    "torch": lambda ix: Engine(ix, backend="torch"),
    "numba": lambda ix: _with(Engine(ix, backend="numba"), NumbaBackend(regime="cpu-accumulate")),
    "numba-dense": lambda ix: _with(Engine(ix, backend="numba"), NumbaBackend(regime="cpu-dense", dense_bytes=2**30)),
    "triton-table": lambda ix: _with(Engine(ix, backend="triton"), _triton("table")),
    "triton-candidate": lambda ix: _with(Engine(ix, backend="triton"), _triton("candidate")),
    "triton-tiled": lambda ix: _with(Engine(ix, backend="triton"), _triton("tiled")),
    "triton-dense": lambda ix: _with(Engine(ix, backend="triton"), _triton("dense")),
    "triton-dense-packed": lambda ix: _with(Engine(ix, backend="triton"), _triton("dense-packed")),
}


def _triton(regime):
    # 32 table slots: collisions, and queries over 16 postings routed to another regime
    return TritonBackend(regime=regime, tile_items=64 if DEVICE == "cpu" else 1024, dense_bytes=2**30,
                         table_slots=32 if DEVICE == "cpu" else None)


def _with(engine, backend):
    engine.backend = backend
    return engine


@pytest.fixture(params=list(ENGINES), scope="module")
def make_engine(request):
    if request.param.startswith("numba") and DEVICE != "cpu":
        pytest.skip("numba runs on CPU indexes")
    return ENGINES[request.param]


def random_bags(rng, n_queries, n_codes, longest, weighted):
    """Ragged bags (some empty, some with repeated codes) and their weights."""
    bags = [rng.integers(0, n_codes, size=int(rng.integers(0, longest + 1))).tolist() for _ in range(n_queries)]
    bags[0] = bags[0][:1] * 3  # a code repeated (or an empty bag)
    weights = [rng.choice(EXACT_WEIGHTS, size=len(b)).tolist() for b in bags] if weighted else None
    return bags, weights


def flat(bags, weights=None):
    codes = torch.tensor([c for b in bags for c in b], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(b) for b in bags], dtype=torch.int64).cumsum(0)
    w = None if weights is None else torch.tensor([x for ws in weights for x in ws], dtype=torch.float32)
    return codes, offsets, w


@pytest.mark.parametrize("case", range(10))
def test_ragged_weighted_bags_match_the_oracle(make_engine, case):
    rng = np.random.default_rng(case)
    dtype = [torch.float16, torch.bfloat16, torch.float32][case % 3]
    n_codes, n_items = int(rng.integers(2, 20)), int(rng.integers(1, 150))
    index = quantized_index(n_codes, n_items, float(rng.uniform(0, 25)), seed=case, dtype=dtype, negative=case % 3 == 1)
    bags, weights = random_bags(rng, int(rng.integers(1, 5)), n_codes, 6, weighted=case % 2 == 0)
    exclude = [rng.choice(n_items, size=int(rng.integers(0, min(n_items, 12) + 1)), replace=False) for _ in bags]
    engine = make_engine(index.to(DEVICE))
    codes, offsets, w = flat(bags, weights)
    for k in (1, 4, 200):
        got = engine.search(codes.to(DEVICE), k=k, offsets=offsets.to(DEVICE), weights=None if w is None else w.to(DEVICE),
                            exclude=exclude)
        want = top_k(bag_scores(index, bags, weights, exclude), k)
        assert_same_results(got.scores.cpu(), got.ids.cpu(), *want)


def test_floor_binds_with_exclusions_and_weights(make_engine):
    # all scores positive, so the floor is on: k = 1 with the top item excluded, and
    # weights under 1 (a floor that ignored them would sit above every true sum)
    index = quantized_index(6, 80, 40, seed=5, dtype=torch.float32)
    bags = [[0, 1, 2], [3], [4, 5, 4], [1]]
    weights = [[0.25, 0.5, 0.25], [0.25], [0.5, 0.25, 0.25], [1.0]]
    truth = bag_scores(index, bags, weights)
    top = [int(np.nanargmax(row)) for row in truth]
    every = np.nonzero(~np.isnan(truth[3]))[0]
    exclude = [np.array([top[0]]), np.array([top[1]]), np.array(sorted(set(range(80)) - {top[2]})), every[:-1]]
    engine = make_engine(index.to(DEVICE))
    codes, offsets, w = flat(bags, weights)
    for k in (1, 3):
        got = engine.search(codes.to(DEVICE), k=k, offsets=offsets.to(DEVICE), weights=w.to(DEVICE), exclude=exclude)
        assert_same_results(got.scores.cpu(), got.ids.cpu(), *top_k(bag_scores(index, bags, weights, exclude), k))
        unweighted = engine.search(codes.to(DEVICE), k=k, offsets=offsets.to(DEVICE), exclude=exclude)
        assert_same_results(unweighted.scores.cpu(), unweighted.ids.cpu(), *top_k(bag_scores(index, bags, None, exclude), k))


def test_weights_that_cancel_keep_their_candidates(make_engine):
    # item 1 sums to 1 x 2 - 1 x 2 = 0 and item 2 to 0 x 3: both stay candidates with score 0
    index = csr_index([[(1, 2.0), (2, 3.0)], [(1, 2.0)]], n_items=4).to(DEVICE)
    engine = make_engine(index)
    got = engine.search(torch.tensor([0, 1], device=DEVICE), k=3, offsets=torch.tensor([0, 2], device=DEVICE),
                        weights=torch.tensor([0.0, -1.0], device=DEVICE))
    assert got.ids.cpu().tolist() == [[2, 1, -1]] and got.scores.cpu().tolist()[0][:2] == [0.0, -2.0]
    got = engine.search(torch.tensor([0, 1, 1], device=DEVICE), k=3, offsets=torch.tensor([0, 3], device=DEVICE),
                        weights=torch.tensor([1.0, -0.5, -0.5], device=DEVICE))
    assert got.ids.cpu().tolist() == [[2, 1, -1]] and got.scores.cpu().tolist()[0][:2] == [3.0, 0.0]


def test_empty_bags_return_padding(make_engine):
    index = quantized_index(8, 30, 6, seed=2).to(DEVICE)
    engine = make_engine(index)
    codes, offsets, _ = flat([[], [3, 4], []])
    got = engine.search(codes.to(DEVICE), k=4, offsets=offsets.to(DEVICE))
    assert (got.ids[0] == -1).all() and (got.ids[2] == -1).all() and torch.isinf(got.scores[0]).all()
    assert_same_results(got.scores.cpu(), got.ids.cpu(), *top_k(bag_scores(index, [[], [3, 4], []]), 4))
    nothing = engine.search(torch.zeros(0, dtype=torch.int64, device=DEVICE), k=2,
                            offsets=torch.zeros(4, dtype=torch.int64, device=DEVICE))
    assert nothing.ids.shape == (3, 2) and (nothing.ids == -1).all()


def test_spellings_agree():
    index = quantized_index(16, 60, 8, seed=3)
    engine = Engine(index, backend="torch")
    bags = [[1, 2, 3], [4], [5, 6, 7, 8, 9], []]
    weights = [[0.5, 1.0, 2.0], [3.0], [1.0, 1.0, -1.0, 0.25, 0.5], []]
    codes, offsets, w = flat(bags, weights)
    want = engine.search(codes, k=5, offsets=offsets, weights=w)
    nested = torch.nested.nested_tensor([torch.tensor(b, dtype=torch.int64) for b in bags], layout=torch.jagged)
    by_nested = engine.search(nested, k=5, weights=w)
    assert torch.equal(by_nested.ids, want.ids) and torch.equal(by_nested.scores, want.scores)
    as_numpy = engine.search(codes.numpy(), k=5, offsets=offsets.numpy(), weights=w.numpy())
    assert isinstance(as_numpy.ids, np.ndarray) and np.array_equal(as_numpy.ids, want.ids.numpy())
    # a dense (B, T) batch with (B, T) weights is the bag form with T codes each
    dense = torch.tensor([[1, 2, 3], [4, 5, 6]])
    dense_w = torch.tensor([[0.5, 1.0, 2.0], [3.0, -1.0, 0.25]])
    by_dense = engine.search(dense, k=5, weights=dense_w)
    by_bags = engine.search(dense.reshape(-1), k=5, offsets=torch.tensor([0, 3, 6]), weights=dense_w.reshape(-1))
    assert torch.equal(by_dense.ids, by_bags.ids) and torch.equal(by_dense.scores, by_bags.scores)
    ones = engine.search(dense, k=5, weights=torch.ones(2, 3))
    plain = engine.search(dense, k=5)
    assert torch.equal(ones.ids, plain.ids) and torch.equal(ones.scores, plain.scores)


@pytest.mark.parametrize(
    ("batch", "kwargs", "error", "message"),
    [
        (torch.tensor([1, 2, 3]), {"offsets": torch.tensor([1, 3])}, ValueError, "offsets: must start at 0"),
        (torch.tensor([1, 2, 3]), {"offsets": torch.tensor([0, 2])}, ValueError, "offsets: must end at the number of values (3)"),
        (torch.tensor([1, 2, 3]), {"offsets": torch.tensor([0, 2, 1, 3])}, ValueError, "offsets: must be non-decreasing"),
        (torch.tensor([1, 2, 3]), {"offsets": torch.tensor([0.0, 3.0])}, TypeError, "offsets: expected integer offsets"),
        (torch.tensor([1, 2, 3]), {"offsets": torch.tensor([[0, 3]])}, ValueError, "offsets: expected a 1-d array"),
        (torch.tensor([1, 16, 3]), {"offsets": torch.tensor([0, 3])}, ValueError, "batch: code 16 is outside [0, 16)"),
        (torch.tensor([[1, 2]]), {"offsets": torch.tensor([0, 2])}, ValueError, "batch: with offsets, expected 1-d flat codes"),
        (torch.tensor([1, 2, 3]), {"offsets": torch.tensor([0, 3]), "weights": torch.ones(2)}, ValueError,
         "weights: expected one weight per code, shape (3,)"),
        (torch.tensor([1, 2, 3]), {"offsets": torch.tensor([0, 3]), "weights": torch.tensor([1.0, float("nan"), 1.0])},
         ValueError, "weights: contain NaN or infinite"),
        (torch.tensor([1, 2, 3]), {"offsets": torch.tensor([0, 3]), "weights": torch.tensor([1.0, float("inf"), 1.0])},
         ValueError, "weights: contain NaN or infinite"),
        (torch.tensor([1, 2, 3]), {"offsets": torch.tensor([0, 3]), "weights": torch.ones(3, dtype=torch.bool)},
         TypeError, "weights: expected real numbers"),
        (torch.tensor([[1, 2]]), {"weights": torch.ones(1, 3)}, ValueError, "weights: expected one weight per code, shape (1, 2)"),
        (torch.nested.nested_tensor([torch.tensor([1, 2])], layout=torch.jagged), {"offsets": torch.tensor([0, 2])},
         ValueError, "offsets: a nested batch carries its own offsets"),
    ],
)
def test_bad_bags_name_the_argument(batch, kwargs, error, message):
    engine = Engine(quantized_index(16, 40, 5, seed=1), backend="torch")
    with pytest.raises(error) as info:
        engine.search(batch, k=3, **kwargs)
    assert message in str(info.value)


def test_floor_is_a_lower_bound_and_off_for_negative_weights():
    rng = np.random.default_rng(7)
    index = quantized_index(12, 90, 20, seed=7, dtype=torch.float32)
    bags, weights = random_bags(rng, 30, 12, 6, weighted=False)
    weights = [rng.choice([0.0, 0.25, 0.5, 1.0, 3.0], size=len(b)).tolist() for b in bags]
    weights[1] = [-0.5] + weights[1][1:] if bags[1] else weights[1]
    codes, offsets, w = flat(bags, weights)
    rank = torch.from_numpy(rng.integers(1, 6, size=len(bags)))
    floor = score_floor(index, Bags(codes, offsets, w), rank)
    truth = bag_scores(index, bags, weights)
    for q, row in enumerate(truth):
        best = np.sort(row[~np.isnan(row)])[::-1]
        if any(x < 0 for x in weights[q]):
            assert floor[q] == float("-inf")
        elif best.size >= rank[q]:
            assert floor[q] <= best[rank[q] - 1]
        else:
            assert floor[q] == float("-inf")
    assert bool(torch.isfinite(floor).any()), "the floor never binds: the test checks nothing"
