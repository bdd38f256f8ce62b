"""Engine(backend="triton") equals the dense oracle and Engine(backend="torch") in both
regimes, exactly (quantized scores make every sum exact, so ties are decided the same way)."""

import numpy as np
import pytest
import torch
from helpers import DEVICE, quantized_index
from oracle import assert_same_results, dense_search

from sparcode.engine import Engine
from sparcode.engine.bags import Bags
from sparcode.engine.synthetic import random_codes
from sparcode.engine.triton_backend import TritonBackend, choose_regime, query_tables, table_size
from sparcode.kernels.table_search import MAX_K


def engines(index, regime):
    triton_engine = Engine(index, backend="triton")
    # small tiles keep the interpreter fast and give several item blocks per query
    # 32 table slots: collisions, and queries over 16 postings routed to another regime
    triton_engine.backend = TritonBackend(regime=regime, tile_items=64 if DEVICE == "cpu" else 1024, dense_bytes=2**30,
                                          table_slots=32 if DEVICE == "cpu" else None)
    return triton_engine, Engine(index, backend="torch")


@pytest.mark.parametrize("regime", ["table", "candidate", "tiled", "dense", "dense-packed"])
@pytest.mark.parametrize("case", range(40))
def test_triton_equals_torch(regime, case):
    rng = np.random.default_rng(case)
    dtype = [torch.float16, torch.bfloat16, torch.float32][case % 3]
    n_codes, n_items = int(rng.integers(2, 24)), int(rng.integers(1, 250))
    index = quantized_index(n_codes, n_items, float(rng.uniform(0, 30)), seed=case, dtype=dtype,
                            negative=case % 4 == 0).to(DEVICE)
    n_queries, n_tokens = int(rng.integers(1, 4)), int(rng.integers(1, 5))
    codes = random_codes(n_queries, n_tokens, n_codes, seed=case, device=DEVICE)
    k = int(rng.choice([1, 3, 10, 50, 500]))
    exclude = [rng.choice(n_items, size=int(rng.integers(0, min(n_items, 20) + 1)), replace=False)
               for _ in range(n_queries)] if case % 2 else None
    fast, reference = engines(index, regime)
    got = fast.search(codes, k=k, exclude=exclude)
    want = reference.search(codes, k=k, exclude=exclude)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)


@pytest.mark.parametrize("regime", ["table", "candidate", "tiled", "dense", "dense-packed"])
@pytest.mark.parametrize("case", range(12))
def test_triton_equals_the_dense_oracle(regime, case):
    rng = np.random.default_rng(1000 + case)
    dtype = [torch.float16, torch.bfloat16, torch.float32][case % 3]
    n_codes, n_items = int(rng.integers(2, 24)), int(rng.integers(1, 250))
    index = quantized_index(n_codes, n_items, float(rng.uniform(0, 30)), seed=case, dtype=dtype, negative=case % 4 == 1)
    n_queries, n_tokens = int(rng.integers(1, 4)), int(rng.integers(1, 5))
    codes = random_codes(n_queries, n_tokens, n_codes, seed=case)
    codes[0] = codes[0, 0]  # one query repeats a single code
    k = int(rng.choice([1, 3, 10, 500]))
    exclude = [rng.choice(n_items, size=int(rng.integers(0, min(n_items, 20) + 1)), replace=False)
               for _ in range(n_queries)] if case % 2 else None
    fast, _ = engines(index.to(DEVICE), regime)
    got = fast.search(codes.to(DEVICE), k=k, exclude=exclude)
    assert_same_results(got.scores.cpu(), got.ids.cpu(), *dense_search(index, codes.numpy(), k, exclude))


def test_auto_regime_follows_the_cost_model():
    # the H200's measured winners, with each regime's batch statistics (mean postings,
    # mean of postings x bag length, longest skip segment, the p99 query's table):
    # R1 and R3 candidate, R2 dense where the rows fit (else tiled), R4 (item codes) table
    assert choose_regime(1_000_000, 4, 11_662, 46_647, 2**11 - 1, table_slots=2**18) == "candidate"
    assert choose_regime(10_000_000, 4, 58_826, 235_306, 2**11 - 1, table_slots=2**20) == "candidate"
    assert choose_regime(1_000_000, 8, 726_460, 5_811_676, 2**14 - 1, dense_fits=True, table_slots=2**22) == "dense"
    assert choose_regime(1_000_000, 8, 726_460, 5_811_676, 2**14 - 1, table_slots=2**22) == "tiled"
    assert choose_regime(1_000_000, 31.8, 15_890, 4_273_367, 31, table_slots=2**18) == "table"
    assert choose_regime(1_000_000, 31.8, 15_890, 4_273_367, 31) == "candidate"  # k over the table's reach
    assert choose_regime(10_000_000, 4, 1_000, 4_000, 2**11 - 1, dense_fits=True) == "candidate"  # dense reads all N
    assert choose_regime(1_000_000, 31.8, 40_000, 4_273_367, 31, table_slots=2**16) == "candidate"  # over the load
    assert table_size(torch.tensor([100] * 199 + [10**6])) == 1024  # the 99th percentile, within the range
    assert table_size(torch.tensor([12_000] * 10)) == 32_768 and table_size(torch.tensor([10**6] * 3)) == 2**21
    assert query_tables(torch.tensor([0, 300, 600, 10**9])).tolist() == [1024, 1024, 2048, 2**22]


def test_dense_regime_respects_its_budget():
    index = quantized_index(8, 300, 200, seed=3)
    codes = random_codes(4, 6, 8, seed=4)
    k = MAX_K + 1  # beyond the table's reach, which would win at this size
    over = TritonBackend(dense_bytes=8 * 300 * 2 - 1).plan(index, Bags.dense(codes), k).regime
    within = TritonBackend(dense_bytes=8 * 300 * 2).plan(index, Bags.dense(codes), k).regime
    assert over != "dense" and within == "dense"
    assert TritonBackend(dense_bytes=0).plan(index, Bags.dense(codes), k).regime != "dense"


@pytest.mark.parametrize("excluded", [False, True])
@pytest.mark.parametrize("regime", ["dense", "dense-packed"])
def test_dense_regime_splits_a_batch_whose_survivors_exceed_the_workspace(monkeypatch, regime, excluded):
    """Full lists of positive scores over 4 tokens: the floor (the best list's k-th score)
    lets most items survive. The batch is searched in parts whose survivors (packed) or
    buckets (K2) fit the engine's workspace, with the same results as one part."""
    import sparcode.kernels.dense_packed as packed_module
    import sparcode.kernels.dense_search as dense_module
    from sparcode.engine.triton_backend import SURVIVOR_BYTES

    index = quantized_index(6, 600, 100_000, seed=7).to(DEVICE)  # every list holds every item
    codes = random_codes(12, 4, 6, seed=8, device=DEVICE)
    rng = np.random.default_rng(9)
    exclude = [rng.choice(600, size=int(rng.integers(0, 10)), replace=False) for _ in range(12)] if excluded else None
    backend = TritonBackend(regime=regime, tile_items=64 if DEVICE == "cpu" else 1024, dense_bytes=2**30)
    workspace = int(backend.plan(index, Bags.dense(codes), 5).per_query_bytes.sum())  # the plan fits the whole batch in one step
    limit = workspace // SURVIVOR_BYTES
    engine = Engine(index, backend="triton", workspace_bytes=workspace)
    backend.workspace_bytes = workspace
    engine.backend = backend
    launches = []
    if regime == "dense-packed":  # one query has at most 600 survivors
        keys_of = packed_module.dense_keys

        def counted(*args, **kwargs):
            owners, keys = keys_of(*args, **kwargs)
            launches.append(owners.numel())
            return owners, keys

        monkeypatch.setattr(packed_module, "dense_keys", counted)
    else:  # bucket slots: queries x width
        buckets_of = dense_module.dense_buckets

        def counted(rows, codes, offsets, weights, floor, order, width, **kwargs):
            launches.append(order.numel() * width)
            return buckets_of(rows, codes, offsets, weights, floor, order, width, **kwargs)

        monkeypatch.setattr(dense_module, "dense_buckets", counted)
    got = engine.search(codes, k=5, exclude=exclude)
    want = Engine(index, backend="torch").search(codes, k=5, exclude=exclude)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    assert len(launches) > 1 and max(launches) <= limit and sum(launches) > limit


def test_regime_is_validated():
    with pytest.raises(ValueError, match="regime: expected one of"):
        TritonBackend(regime="sparse")


@pytest.mark.gpu
@pytest.mark.parametrize("regime", ["auto", "table", "candidate", "tiled", "dense", "dense-packed"])
def test_triton_equals_torch_at_scale_gpu(regime):
    index = quantized_index(4096, 200_000, 300, seed=1).to("cuda")
    codes = random_codes(512, 4, 4096, seed=2, device="cuda")
    exclude = [np.arange(q, 200_000, 1000) for q in range(512)]
    fast, reference = engines(index, regime)
    got, want = fast.search(codes, k=100, exclude=exclude), reference.search(codes, k=100, exclude=exclude)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)


@pytest.mark.gpu
def test_large_k_gpu():
    index = quantized_index(1024, 50_000, 2_000, seed=3).to("cuda")
    codes = random_codes(32, 4, 1024, seed=4, device="cuda")
    fast, reference = engines(index, "auto")
    got, want = fast.search(codes, k=20_000), reference.search(codes, k=20_000)
    assert torch.equal(got.ids, want.ids)


def test_table_regime_routes_queries_that_do_not_fit(monkeypatch):
    from sparcode.engine import triton_backend

    index = quantized_index(8, 120, 10, seed=5, dtype=torch.float32).to(DEVICE)
    lengths = index.lengths.tolist()
    short = min(range(8), key=lambda c: lengths[c])
    codes = torch.tensor([short, 0, 1, 2, 3, 4, 5], device=DEVICE)
    offsets = torch.tensor([0, 1, 7, 7], device=DEVICE)  # fits a 32-slot table / 60 postings / empty
    assert lengths[short] <= 16 < sum(lengths[:6])
    seen = []
    kernel = triton_backend.table_search
    monkeypatch.setattr(triton_backend, "table_search", lambda *a, **kw: seen.append(a[9].tolist()) or kernel(*a, **kw))
    fast = Engine(index, backend="triton")
    fast.backend = TritonBackend(regime="table", tile_items=64, table_slots=32)
    exclude = [[1, 2], [int(index.items[0])], []]
    for k in (3, 2000):  # 2000 > MAX_K: every query goes another way
        seen.clear()
        got = fast.search(codes, k=k, offsets=offsets, exclude=exclude)
        want = Engine(index, backend="torch").search(codes, k=k, offsets=offsets, exclude=exclude)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
        assert seen == ([[0, 2]] if k == 3 else [])


def test_table_regime_launches_one_table_size_per_bin(monkeypatch):
    from sparcode.engine import triton_backend

    index = quantized_index(6, 900, 300, seed=9, dtype=torch.float32).to(DEVICE)
    assert index.lengths.tolist() == [357, 197, 180, 242, 204, 279]
    codes = torch.tensor([1, 0, 3, 5, 3], device=DEVICE)
    offsets = torch.tensor([0, 1, 3, 5], device=DEVICE)  # 197 postings (1,024 slots); 599 and 521 (2,048)
    launches = []
    kernel = triton_backend.table_search
    monkeypatch.setattr(triton_backend, "table_search",
                        lambda *a, **kw: launches.append((kw["table"], a[9].tolist())) or kernel(*a, **kw))
    fast = Engine(index, backend="triton")
    fast.backend = TritonBackend(regime="table", tile_items=64)
    got = fast.search(codes, k=4, offsets=offsets, exclude=[[1], [], [2, 3]])
    want = Engine(index, backend="torch").search(codes, k=4, offsets=offsets, exclude=[[1], [], [2, 3]])
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    assert sorted(launches) == [(1024, [0]), (2048, [1, 2])]
