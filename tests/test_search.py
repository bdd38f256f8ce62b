"""Engine.search (torch backend) against the dense numpy oracle and the spec."""

import numpy as np
import pytest
import torch
from helpers import csr_index, quantized_index
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import assert_equivalent_results, assert_same_results, dense_search

from sparcode.engine import CodeIndex, Engine, SearchResult
from sparcode.engine.bags import Bags
from sparcode.engine.synthetic import random_codes, random_index


@pytest.fixture(params=["torch", "numba"], scope="module")
def cpu_backend(request):
    """Every CPU backend must give exactly the oracle's answer."""
    return request.param


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_tokens", range(1, 9))
@pytest.mark.parametrize("seed", range(3))
def test_matches_dense_oracle_exactly(cpu_backend, dtype, n_tokens, seed):
    index = quantized_index(48, 150, 12, seed=seed, dtype=dtype, negative=seed == 2)
    codes = random_codes(20, n_tokens, 48, seed=seed + 10)
    codes[0] = codes[0, 0]  # one query repeats a single code T times
    engine = Engine(index, backend=cpu_backend)
    for k in (1, 7, 60, 400):  # 400 is beyond every query's candidate count
        result = engine.search(codes, k=k)
        assert result.scores.shape == (20, k) and result.scores.dtype == torch.float32
        assert result.ids.dtype == torch.int64
        ref = dense_search(index, codes.numpy(), k)
        assert_same_results(result.scores, result.ids, *ref)


@pytest.mark.parametrize("seed", range(8))
def test_matches_dense_oracle_continuous_scores(cpu_backend, seed):
    index = random_index(64, 300, 20, seed=seed, dtype=torch.float32)
    codes = random_codes(32, 4, 64, seed=seed)
    result = Engine(index, backend=cpu_backend).search(codes, k=25)
    assert_equivalent_results(result.scores, result.ids, index, codes.numpy(), 25)


def test_repeated_code_counts_twice_and_ties_go_to_lower_id(cpu_backend):
    index = csr_index([[(3, 1.0), (5, 2.0)], [(1, 2.0), (3, 0.5)]], n_items=8)
    scores, ids = Engine(index, backend=cpu_backend).search(torch.tensor([[0, 0], [0, 1]]), k=4)
    assert ids[0].tolist() == [5, 3, -1, -1]
    assert scores[0, :2].tolist() == [4.0, 2.0] and scores[0, 2:].tolist() == [float("-inf")] * 2
    # query 1: item 5 -> 2.0, item 1 -> 2.0 (tie: lower id first), item 3 -> 1.5
    assert ids[1].tolist() == [1, 5, 3, -1]
    assert scores[1, :3].tolist() == [2.0, 2.0, 1.5]


def test_empty_posting_lists_give_padding(cpu_backend):
    index = csr_index([[], [(2, 1.0)], []], n_items=4)
    scores, ids = Engine(index, backend=cpu_backend).search(torch.tensor([[0, 2], [0, 1]]), k=3)
    assert ids.tolist() == [[-1, -1, -1], [2, -1, -1]]
    assert torch.isinf(scores[0]).all() and scores[1, 0] == 1.0


def test_zero_and_negative_scores_are_still_candidates(cpu_backend):
    index = csr_index([[(0, 0.0), (1, -1.0)], [(1, 1.0)]], n_items=3)
    scores, ids = Engine(index, backend=cpu_backend).search(torch.tensor([[0, 1]]), k=3)
    assert ids.tolist() == [[0, 1, -1]]  # item 1 sums to exactly 0.0 and stays a candidate
    assert scores[0, :2].tolist() == [0.0, 0.0]


def test_exclude_as_list_and_csr_agree_with_oracle(cpu_backend):
    index = quantized_index(32, 100, 10, seed=4)
    codes = random_codes(12, 3, 32, seed=5)
    rng = np.random.default_rng(0)
    exclude = [rng.choice(100, size=rng.integers(0, 30), replace=False) for _ in range(12)]
    engine = Engine(index, backend=cpu_backend)
    by_list = engine.search(codes, k=15, exclude=exclude)
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in exclude])])
    by_csr = engine.search(codes, k=15, exclude=(offsets, np.concatenate(exclude)))
    ref = dense_search(index, codes.numpy(), 15, exclude)
    assert_same_results(by_list.scores, by_list.ids, *ref)
    assert_same_results(by_csr.scores, by_csr.ids, *ref)


def test_all_candidates_excluded(cpu_backend):
    index = csr_index([[(0, 1.0), (2, 3.0)]], n_items=4)
    scores, ids = Engine(index, backend=cpu_backend).search(torch.tensor([[0]]), k=2, exclude=[[0, 2, 3]])
    assert ids.tolist() == [[-1, -1]] and torch.isinf(scores).all()


def test_external_ids_map_results_and_exclusions(cpu_backend):
    item_ids = torch.tensor([1000, 17, 5, 99], dtype=torch.int64)
    index = csr_index([[(0, 1.0), (1, 3.0), (3, 2.0)]], n_items=4, item_ids=item_ids)
    engine = Engine(index, backend=cpu_backend)
    assert engine.search(torch.tensor([[0]]), k=4).ids.tolist() == [[17, 99, 1000, -1]]
    # 17 is excluded by external id; 123456 is unknown and ignored
    assert engine.search(torch.tensor([[0]]), k=4, exclude=[[17, 123456]]).ids.tolist() == [[99, 1000, -1, -1]]


def test_result_kind_follows_input_and_unpacks(cpu_backend):
    index = quantized_index(16, 40, 5, seed=1)
    codes = random_codes(4, 2, 16, seed=1)
    engine = Engine(index, backend=cpu_backend)
    result = engine.search(codes.numpy(), k=3)
    assert isinstance(result, SearchResult)
    scores, ids = result
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and ids.dtype == np.int64
    torch_ids = engine.search(codes.to(torch.int32), k=3).ids
    assert isinstance(torch_ids, torch.Tensor) and torch_ids.tolist() == ids.tolist()


def test_empty_batch(cpu_backend):
    engine = Engine(quantized_index(16, 40, 5, seed=1), backend=cpu_backend)
    scores, ids = engine.search(torch.empty((0, 3), dtype=torch.int64), k=5)
    assert scores.shape == (0, 5) and ids.shape == (0, 5)


def test_large_batch_runs_in_bounded_chunks(cpu_backend, monkeypatch):
    index = random_index(256, 2000, 40, seed=3, dtype=torch.float32)
    codes = random_codes(500, 4, 256, seed=3)
    whole = Engine(index, backend=cpu_backend).search(codes, k=10)
    def need(chunk):  # the workspace a chunk may use, as the engine accounts for it
        bags = chunk if isinstance(chunk, Bags) else Bags.dense(chunk)
        return int(small.backend.plan(index, bags, 10).per_query_bytes.sum())

    small = Engine(index, backend=cpu_backend, workspace_bytes=1)
    budget = need(codes) // 50  # the whole batch needs 50x the workspace
    small.workspace_bytes = budget
    calls = []
    search = small.backend.search
    monkeypatch.setattr(small.backend, "search", lambda *a: calls.append(a[1]) or search(*a))
    chunked = small.search(codes, k=10)
    assert len(calls) >= 50 and sum(c.n_queries for c in calls) == 500
    assert all(need(c) <= budget for c in calls)
    assert torch.equal(chunked.ids, whole.ids) and torch.equal(chunked.scores, whole.scores)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_codes=st.integers(1, 12),
    n_items=st.integers(1, 30),
    n_tokens=st.integers(1, 5),
    n_queries=st.integers(0, 6),
    k=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_property_matches_oracle(cpu_backend, n_codes, n_items, n_tokens, n_queries, k, seed, data):
    rng = np.random.default_rng(seed)
    present = rng.random((n_codes, n_items)) < rng.random()
    lengths = present.sum(1)
    indptr = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    items = torch.tensor(np.nonzero(present)[1], dtype=torch.int32)
    scores = torch.tensor(rng.integers(-8, 9, size=items.numel()) / 4, dtype=torch.float32)
    index = CodeIndex.from_postings(indptr, items, scores, n_items)
    codes = torch.tensor(rng.integers(0, n_codes, size=(n_queries, n_tokens)), dtype=torch.int64)
    exclude = [rng.choice(n_items, size=rng.integers(0, n_items + 1), replace=False) for _ in range(n_queries)]
    use_exclude = data.draw(st.booleans())
    result = Engine(index, backend=cpu_backend).search(codes, k=k, exclude=exclude if use_exclude else None)
    ref = dense_search(index, codes.numpy(), k, exclude if use_exclude else None)
    assert_same_results(result.scores, result.ids, *ref)


@pytest.mark.parametrize(
    ("batch", "kwargs", "error", "message"),
    [
        (torch.zeros(3, dtype=torch.int64), {}, ValueError, "batch: expected (B, T) codes, or flat codes with offsets"),
        (torch.zeros((2, 3), dtype=torch.bool), {}, TypeError, "batch: expected integer codes"),
        (torch.zeros((2, 3), dtype=torch.float32), {}, TypeError, "batch: got torch.float32 features but this engine has no encoder"),
        (torch.tensor([[0, 16, 1]]), {}, ValueError, "batch: code 16 is outside [0, 16)"),
        (torch.tensor([[-1, 0, 0]]), {}, ValueError, "batch: code -1 is outside"),
        (torch.zeros((2, 5), dtype=torch.int64), {}, ValueError, "batch: expected T = 3 codes"),
        ([[0, 1, 2]], {}, TypeError, "batch: expected a torch tensor, numpy array or cupy array"),
        (torch.zeros((1, 3), dtype=torch.int64), {"k": 0}, ValueError, "k: expected an integer >= 1"),
        (torch.zeros((1, 3), dtype=torch.int64), {"k": 2.5}, ValueError, "k: expected an integer >= 1"),
        (torch.zeros((1, 3), dtype=torch.int64), {"exclude": [[1], [2]]}, ValueError, "exclude: expected one item list per query"),
        (torch.zeros((1, 3), dtype=torch.int64), {"exclude": ([0, 2], [1])}, ValueError, "exclude offsets: must end at the number of values (1)"),
        (torch.zeros((1, 3), dtype=torch.int64), {"exclude": ([0, 1, 1], [1])}, ValueError, "exclude offsets: must have B + 1 = 2"),
        (torch.zeros((1, 3), dtype=torch.int64), {"exclude": [[0.5]]}, TypeError, "exclude[0]: expected integer item ids"),
        (torch.zeros((1, 3), dtype=torch.int64), {"exclude": "all"}, TypeError, "exclude: expected CSR"),
    ],
)
def test_bad_arguments_name_the_argument(cpu_backend, batch, kwargs, error, message):
    engine = Engine(quantized_index(16, 40, 5, seed=1, n_tokens=3), backend=cpu_backend)
    with pytest.raises(error) as info:
        engine.search(batch, **kwargs)
    assert message in str(info.value)


def test_bad_engine_arguments():
    index = quantized_index(16, 40, 5, seed=1)
    with pytest.raises(ValueError, match="backend: expected one of"):
        Engine(index, backend="faiss")
    with pytest.raises(ValueError, match="workspace_bytes"):
        Engine(index, workspace_bytes=0)
    with pytest.raises(TypeError, match="index: expected a CodeIndex"):
        Engine("index.dir")


def test_encoder_turns_features_into_codes_and_rejects_nan(cpu_backend):
    index = quantized_index(16, 40, 5, seed=1)
    encoder = lambda x: (x.abs() * 100).to(torch.int64) % 16  # noqa: E731
    engine = Engine(index, encoder=encoder, backend=cpu_backend)
    features = torch.rand(5, 3)
    assert torch.equal(engine.search(features, k=4).ids, engine.search(encoder(features), k=4).ids)
    features[2, 1] = float("nan")
    with pytest.raises(ValueError, match="batch: features contain NaN"):
        engine.search(features, k=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_on_other_device_is_rejected(cpu_backend):
    engine = Engine(quantized_index(16, 40, 5, seed=1), backend=cpu_backend)
    with pytest.raises(ValueError, match="batch: is on cuda"):
        engine.search(torch.zeros((1, 2), dtype=torch.int64, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [1, 5, 64, 1 << 24])
def test_descending_scores_sorts_each_list_in_blocks(block, dtype, monkeypatch):
    """The floor's derived layout is sorted a block of whole lists at a time: the same
    per-list order whatever the block, including lists longer than a block and empty ones,
    in the index's own dtype (its values exactly)."""
    import sparcode.engine.selection as backend

    monkeypatch.setattr(backend, "SORT_BLOCK", block)
    index = random_index(40, 30, 8.0, seed=3, dtype=dtype)
    assert int(index.lengths.max()) > 5
    got = backend.descending_scores(index)
    for code in range(index.n_codes):
        lo, hi = int(index.indptr[code]), int(index.indptr[code + 1])
        want = torch.sort(index.scores[lo:hi], descending=True).values
        assert got.dtype == index.scores.dtype and torch.equal(got[lo:hi], want), code


def test_the_oracle_comparison_rejects_anything_but_tie_reordering():
    """assert_equivalent_results lets tied scores swap and catches every other error: a
    non-candidate id, an excluded id, a repeated id, a wrong score, a missing top item."""
    index = csr_index([[(0, 1.0), (1, 2.0), (2, 2.0), (3, 0.5)], [(1, 1.0), (4, 3.0)], [(5, 1.0)]], n_items=8)
    codes = np.array([[0, 0]])
    exclude = [np.array([3])]
    ref_scores, ref_ids = dense_search(index, codes, 3, exclude)
    assert ref_ids.tolist() == [[1, 2, 0]] and ref_scores.tolist() == [[4.0, 4.0, 2.0]]
    assert_equivalent_results(ref_scores, ref_ids, index, codes, 3, exclude)
    assert_equivalent_results(ref_scores, np.array([[2, 1, 0]]), index, codes, 3, exclude)  # a tie swapped: fine
    wrong = {
        "not a candidate": ([[4.0, 4.0, 2.0]], [[1, 2, 6]]),
        "excluded": ([[4.0, 4.0, 2.0]], [[1, 2, 3]]),
        "returned twice": ([[4.0, 4.0, 4.0]], [[1, 2, 1]]),
        "wrong score": ([[4.0, 4.0, 2.5]], [[1, 2, 0]]),
        "not the top k": ([[4.0, 2.0, 1.0]], [[1, 0, 3]]),
        "padding": ([[4.0, 4.0, -np.inf]], [[1, 2, -1]]),
    }
    for case, (scores, ids) in wrong.items():
        try:
            assert_equivalent_results(np.array(scores, dtype=np.float32), np.array(ids), index, codes, 3, exclude)
        except AssertionError:
            continue
        pytest.fail(f"the oracle accepted a result with a fault: {case}")


def test_negative_zero_ties_with_zero_and_goes_by_id(cpu_backend):
    index = csr_index([[(3, -0.0), (5, 0.0), (7, -1.0)]], n_items=8)
    scores, ids = Engine(index, backend=cpu_backend).search(torch.tensor([[0]]), k=3)
    assert ids.tolist() == [[3, 5, 7]] and scores[0].tolist() == [0.0, 0.0, -1.0]
