"""Triton kernels vs their torch references (bit-exact keys), on the interpreter with tiny
shapes (a few programs each) and, marked ``gpu``, at realistic sizes on CUDA."""

import numpy as np
import pytest
import torch
from helpers import DEVICE, csr_index, quantized_index

from sparcode.engine.synthetic import random_codes
from sparcode.kernels import candidate_search as cs
from sparcode.kernels import reference as ref
from sparcode.kernels import table_search as tbl
from sparcode.kernels import tiled_search as ts
from sparcode.kernels.keys import EMPTY_KEY, SurvivorOverflow

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def exclusion(lists, device=DEVICE):
    offsets = torch.tensor([0] + [len(x) for x in lists], dtype=torch.int64).cumsum(0)
    items = torch.tensor(sorted_concat(lists) or [0], dtype=torch.int64)
    return offsets.to(device), items.to(device)


def as_bags(codes, weights=None):
    """(flat codes, offsets, weights) of a (B, T) code matrix: the kernels' bag layout."""
    n, t = codes.shape
    offsets = torch.arange(n + 1, dtype=torch.int64, device=codes.device) * t
    return codes.reshape(-1), offsets, None if weights is None else weights.reshape(-1)


def sorted_concat(lists):
    return [i for x in lists for i in sorted(x)]


def check_candidate(index, bags, ex, *, block=32):
    """``bags``: (flat codes, offsets, weights)."""
    codes, bag_offsets, _ = bags
    offsets = cs.query_offsets(index.indptr, codes, bag_offsets)
    assert torch.equal(offsets, ref.query_offsets(index.indptr, codes, bag_offsets))
    args = (index.indptr, index.items, index.scores, *bags, *ex, offsets)
    got = cs.candidate_keys(*args, block=block)
    assert torch.equal(got, ref.candidate_keys(*args)), "candidate keys differ from the reference"
    for shift in (0, 2, 5):  # superblocks of 1, 4 and 32 items: narrowed searches give the same keys
        skip = cs.skip_table(index.indptr, index.items, index.n_items, shift)
        assert torch.equal(cs.candidate_keys(*args, block=block, skip=skip), got)
    want = ref.candidate_search(index.indptr, index.items, index.scores, *bags, *ex, 9)
    n = bag_offsets.numel() - 1
    skip = cs.skip_table(index.indptr, index.items, index.n_items, 3)
    for floor in (None, torch.full((n,), float("-inf"), device=codes.device), survivor_floor(want[0], 8)):
        for table in (None, skip):
            found = cs.candidate_search(index.indptr, index.items, index.scores, *bags, *ex, 9, floor=floor, skip=table)
            assert torch.equal(found[0], want[0]) and torch.equal(found[1], want[1])
        if floor is not None:
            for capacity in (None, 1):  # 1: the first launch overflows, the second fits exactly
                survivors = cs.candidate_survivors(*args, floor, block=block, capacity=capacity, skip=skip)
                expected = ref.candidate_survivors(*args, floor)
                assert torch.equal(survivors[0], expected[0]) and torch.equal(survivors[1], expected[1])
    return got


def survivor_floor(top_scores, rank):
    """The tightest valid floor: each query's own rank-th best score (-inf, the padding, where it has none)."""
    return top_scores[:, rank].clone()


def check_tiled(index, bags, ex, kb, *, block_n=64, n_programs=3):
    args = (index.indptr, index.items, index.scores, *bags, *ex, index.n_items, kb)
    got = ts.tiled_keys(*args, block_n=block_n, chunk=16, n_programs=n_programs)
    assert torch.equal(got, ref.tiled_keys(*args, block_n=block_n)), "tiled keys differ from the reference"
    return got


@pytest.mark.parametrize("dtype", DTYPES)
def test_candidate_random(dtype):
    index = quantized_index(16, 300, 12, seed=3, dtype=dtype, negative=dtype == torch.float32).to(DEVICE)
    codes = random_codes(3, 3, 16, seed=4, device=DEVICE)
    check_candidate(index, as_bags(codes), exclusion([[], [5, 77, 130], [299]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_random_odd_item_count(dtype):
    index = quantized_index(16, 201, 15, seed=5, dtype=dtype, negative=dtype == torch.float32).to(DEVICE)  # 201: not a block multiple
    codes = random_codes(2, 3, 16, seed=6, device=DEVICE)
    check_tiled(index, as_bags(codes), exclusion([[0, 200], [63, 64, 65]]), kb=7)


def test_edge_cases_both_regimes():
    # code 1 and 3 are empty lists; query 0 repeats code 0; query 2 has only empty lists
    index = csr_index([[(0, 1.0), (5, 2.0), (9, 0.5)], [], [(5, 1.0), (6, 3.0)], []], n_items=10).to(DEVICE)
    codes = torch.tensor([[0, 0, 2], [2, 1, 0], [1, 3, 3]], device=DEVICE)
    ex = exclusion([[], [0, 5, 6, 9], []])  # query 1: every candidate excluded
    keys = check_candidate(index, as_bags(codes), ex, block=4)
    check_tiled(index, as_bags(codes), ex, kb=3, block_n=4)  # 10 items in blocks of 4
    scores, ids = cs.candidate_search(index.indptr, index.items, index.scores, *as_bags(codes), *ex, 5)
    assert ids.tolist() == [[5, 6, 0, 9, -1], [-1] * 5, [-1] * 5]
    assert scores[0, :4].tolist() == [5.0, 3.0, 2.0, 1.0]
    assert keys.numel() == (3 + 3 + 2) + (2 + 0 + 3) + 0  # query 2 has only empty lists: no keys
    t_scores, t_ids = ts.tiled_search(index.indptr, index.items, index.scores, *as_bags(codes), *ex, 5, 10, block_n=4)
    assert torch.equal(t_ids, ids) and torch.equal(t_scores, scores)


def test_single_query_and_k_beyond_candidates():
    index = quantized_index(8, 100, 6, seed=7).to(DEVICE)
    codes = random_codes(1, 2, 8, seed=8, device=DEVICE)
    ex = exclusion([[]])
    offsets = ref.query_offsets(index.indptr, *as_bags(codes)[:2])
    n_cand = int((ref.candidate_keys(index.indptr, index.items, index.scores, *as_bags(codes), *ex, offsets) != EMPTY_KEY).sum())
    k = n_cand + 5
    c = cs.candidate_search(index.indptr, index.items, index.scores, *as_bags(codes), *ex, k)
    t = ts.tiled_search(index.indptr, index.items, index.scores, *as_bags(codes), *ex, k, 100, block_n=128)
    r = ref.candidate_search(index.indptr, index.items, index.scores, *as_bags(codes), *ex, k)
    assert torch.equal(c[1], r[1]) and torch.equal(t[1], r[1])
    assert (r[1][0, n_cand:] == -1).all() and (r[1][0, :n_cand] >= 0).all()


def test_block_smaller_than_k_keeps_whole_blocks():
    index = quantized_index(4, 40, 30, seed=9).to(DEVICE)
    codes = torch.tensor([[0, 1], [2, 3]], device=DEVICE)
    check_tiled(index, as_bags(codes), exclusion([[], []]), kb=100, block_n=16)  # kb is capped at the block


def test_empty_batch():
    index = quantized_index(4, 40, 5, seed=1).to(DEVICE)
    codes = torch.empty((0, 2), dtype=torch.int64, device=DEVICE)
    ex = exclusion([])
    assert cs.candidate_search(index.indptr, index.items, index.scores, *as_bags(codes), *ex, 3)[1].shape == (0, 3)
    assert ts.tiled_search(index.indptr, index.items, index.scores, *as_bags(codes), *ex, 3, 40)[1].shape == (0, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_candidate_realistic_gpu(dtype):
    index = quantized_index(4096, 100_000, 200, seed=11, dtype=dtype).to("cuda")
    codes = random_codes(64, 4, 4096, seed=12, device="cuda")
    check_candidate(index, as_bags(codes), exclusion([list(range(0, 100_000, 97 + q)) for q in range(64)], "cuda"), block=128)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_realistic_gpu(dtype):
    index = quantized_index(256, 50_000, 5_000, seed=13, dtype=dtype).to("cuda")
    codes = random_codes(16, 8, 256, seed=14, device="cuda")
    check_tiled(index, as_bags(codes), exclusion([list(range(q, 50_000, 101)) for q in range(16)], "cuda"), kb=100,
                block_n=1024, n_programs=264)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_keys_random_and_overflowing_capacity(dtype):
    from sparcode.engine.dense import build_rows
    from sparcode.kernels import dense_packed as ds

    index = quantized_index(12, 150, 30, seed=21, dtype=dtype, negative=dtype == torch.float32).to(DEVICE)
    rows = build_rows(index, dtype)
    codes = random_codes(3, 4, 12, seed=22, device=DEVICE)
    codes[0] = codes[0, 0]  # a repeated code
    floor = torch.tensor([float("-inf"), 2.0, 0.5], device=DEVICE)
    for capacity in (None, 1):  # 1: the first launch overflows and the second fits exactly
        got = ds.dense_keys(rows, *as_bags(codes), floor, block_n=64, capacity=capacity)  # 150 items: not a tile multiple
        want = ref.dense_keys(rows, *as_bags(codes), floor)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ex = exclusion([[], [5, 77, 130], list(range(150))])  # query 2: every item excluded
    found = ds.dense_packed_search(rows, *as_bags(codes), floor, *ex, 9, block_n=64)
    expected = ref.dense_packed_search(rows, *as_bags(codes), floor, *ex, 9)
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])
    assert (found[1][2] == -1).all()
    total = int(want[0].numel())
    for keys_of in (ds.dense_keys, ref.dense_keys):  # over the limit: an error, not an allocation
        with pytest.raises(SurvivorOverflow, match=f"{total} survivors"):
            keys_of(rows, *as_bags(codes), floor, block_n=64, limit=total - 1)
    split = ds.dense_packed_search(rows, *as_bags(codes), floor, *ex, 9, block_n=64, max_survivors=20)  # searched in parts
    assert torch.equal(split[0], expected[0]) and torch.equal(split[1], expected[1])


def test_dense_edge_cases():
    from sparcode.engine.dense import build_rows
    from sparcode.kernels import dense_packed as ds

    # code 1 is empty; query 2 only empty lists; zero and negative scores are candidates
    index = csr_index([[(0, 1.0), (5, 0.0), (9, -0.5)], [], [(5, 1.0), (6, 3.0)]], n_items=10).to(DEVICE)
    rows = build_rows(index, torch.float32)
    codes = torch.tensor([[0, 0, 2], [1, 1, 1], [2, 1, 0]], device=DEVICE)
    floor = torch.full((3,), float("-inf"), device=DEVICE)
    scores, ids = ds.dense_packed_search(rows, *as_bags(codes), floor, *exclusion([[], [], [0]]), 6, block_n=4)
    assert ids.tolist() == [[6, 0, 5, 9, -1, -1], [-1] * 6, [6, 5, 9, -1, -1, -1]]
    assert scores[0, :4].tolist() == [3.0, 2.0, 1.0, -1.0]
    empty = ds.dense_packed_search(rows, *as_bags(codes[:0]), floor[:0], *exclusion([]), 3)
    assert empty[1].shape == (0, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_realistic_gpu(dtype):
    from sparcode.engine.dense import build_rows
    from sparcode.kernels import dense_packed as ds

    index = quantized_index(256, 50_000, 5_000, seed=15, dtype=dtype).to("cuda")
    rows = build_rows(index, dtype)
    codes = random_codes(16, 8, 256, seed=16, device="cuda")
    floor = torch.full((16,), 20.0, device="cuda")
    got, want = ds.dense_keys(rows, *as_bags(codes), floor), ref.dense_keys(rows, *as_bags(codes), floor)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_skip_table_points_at_each_superblock():
    # list 0: items 0, 5, 9, 17; list 1 empty; list 2: 3, 16 (N = 20, superblocks of 8 items)
    index = csr_index([[(0, 1.0), (5, 1.0), (9, 1.0), (17, 1.0)], [], [(3, 1.0), (16, 1.0)]], n_items=20).to(DEVICE)
    table = cs.skip_table(index.indptr, index.items, 20, shift=3)
    assert table.positions.tolist() == [[0, 2, 3, 4], [4, 4, 4, 4], [4, 5, 5, 6]]
    assert table.steps == cs.search_steps(2)  # the longest segment holds 2 postings


def test_survivor_positions_do_not_wrap_past_2_31():
    """A counter already near 2**31 (as after ~2**31 survivors of a huge chunk): further
    survivors must land at positions >= capacity and be counted, not wrap negative and
    store out of bounds. Runs each packing kernel with the counter packed_launch makes."""
    from sparcode.engine.dense import build_rows
    from sparcode.kernels import dense_packed as ds
    from sparcode.kernels.common import new_counter

    index = quantized_index(6, 40, 20, seed=4, dtype=torch.float32).to(DEVICE)
    codes, bag_offsets, _ = as_bags(random_codes(3, 2, 6, seed=5, device=DEVICE))
    floor = torch.full((3,), float("-inf"), device=DEVICE)
    start = 2**31 - 2
    owners, keys = ref.dense_keys(build_rows(index, torch.float32), codes, bag_offsets, None, floor)
    found = keys.numel()
    assert found > 2
    rows = build_rows(index, torch.float32)
    counter = new_counter(DEVICE).fill_(start)
    out, out_owners = torch.full((4,), 7, device=DEVICE), torch.full((4,), 7, device=DEVICE)
    ds._dense_keys_kernel[(3, 1)](rows, codes, bag_offsets, floor, floor, out, out_owners, counter, 40, 4,
                                  BLOCK_N=64, WEIGHTED=False)
    assert int(counter) == start + found and (out == 7).all() and (out_owners == 7).all()
    offsets = cs.query_offsets(index.indptr, codes, bag_offsets)
    ex = exclusion([[], [], []])
    counter = new_counter(DEVICE).fill_(start)
    cs._launch(index.indptr, index.items, index.scores, codes, bag_offsets, None, *ex, offsets, out, 32, floor,
               out_owners, counter, 4)
    assert int(counter) == start + found and (out == 7).all() and (out_owners == 7).all()


def ragged(rng, n_queries, n_codes, longest, weighted, device=DEVICE):
    """Ragged bags (flat codes, offsets, weights): empty ones, a repeated code, and weights
    whose products with quantized scores are exact, negative ones included."""
    lengths = rng.integers(0, longest + 1, size=n_queries)
    lengths[0] = 0
    codes = rng.integers(0, n_codes, size=int(lengths.sum()))
    if n_queries > 1 and lengths[1] >= 2:
        codes[lengths[0] + 1] = codes[lengths[0]]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64, device=device)
    weights = torch.tensor(rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0], size=codes.size), dtype=torch.float32,
                           device=device) if weighted else None
    return torch.tensor(codes, dtype=torch.int64, device=device), offsets, weights


def check_table(index, bags, ex, floor, k, *, table, chunk, n_programs=3):
    codes, offsets, _ = bags
    postings = cs.query_offsets(index.indptr, codes, offsets).diff()
    queries = torch.nonzero(tbl.fits(postings, table)).squeeze(1)
    args = (index.indptr, index.items, index.scores, *bags, *ex, floor, queries, k)
    got = tbl.table_keys(*args, table=table, chunk=chunk, n_programs=n_programs)
    assert torch.equal(got, ref.table_keys(*args)), "table keys differ from the reference"
    return queries


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_table_ragged_bags_with_collisions(dtype, weighted):
    rng = np.random.default_rng(int(weighted) + 7)
    index = quantized_index(12, 200, 3, seed=3, dtype=dtype, negative=dtype == torch.float32).to(DEVICE)
    bags = ragged(rng, 6, 12, 4, weighted)
    ex = exclusion([[], [3, 50], list(range(0, 200, 3)), [], [199], []])
    n = 6
    floors = [torch.full((n,), float("-inf"), device=DEVICE)]
    want = ref.table_keys(index.indptr, index.items, index.scores, *bags, *ex, floors[0], torch.arange(n), 9)
    floors.append(unpack_keys_scores(want)[:, 4].clone())  # a floor that binds: each query's 5th best
    for floor in floors:
        for table, chunk in ((16, 4), (64, 16)):  # 16 slots for up to 8 items: collisions and wrap-around probes
            queries = check_table(index, bags, ex, floor, 9, table=table, chunk=chunk)
            assert queries.numel() >= (3 if table == 16 else 4), "too few queries fit: the case checks little"


def unpack_keys_scores(keys):
    from sparcode.kernels.keys import unpack_keys

    return unpack_keys(keys)[0]


def test_table_edge_cases():
    # every candidate excluded; the top item excluded at k = 1; k above the candidates; empty bags
    index = csr_index([[(0, 1.0), (5, 2.0), (9, 0.5)], [], [(5, 1.0), (6, 3.0)]], n_items=10).to(DEVICE)
    codes = torch.tensor([0, 2, 0, 2, 1, 0, 2], device=DEVICE)
    offsets = torch.tensor([0, 2, 4, 5, 7, 7], device=DEVICE)
    ex = exclusion([[0, 5, 6, 9], [5], [], [], []])
    floor = torch.full((5,), float("-inf"), device=DEVICE)
    for k in (1, 3, 8):
        args = (index.indptr, index.items, index.scores, codes, offsets, None, *ex, floor, torch.arange(5, device=DEVICE), k)
        got = tbl.table_search(*args, table=8, chunk=2, n_programs=2)
        want = ref.table_search(*args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1][0].tolist() == [-1] * 8 and got[1][1].tolist()[:3] == [6, 0, 9]
    assert (got[1][2] == -1).all() and (got[1][4] == -1).all()
    with pytest.raises(ValueError, match="k: the table regime keeps at most"):
        tbl.table_keys(*args[:-1], tbl.MAX_K + 1)
