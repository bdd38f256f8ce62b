"""K2 (``kernels/dense_search.py``) against its torch references and the dense oracle, on
the interpreter with tiny shapes and, marked ``gpu``, at a realistic size on CUDA."""

import numpy as np
import pytest
import torch
from helpers import DEVICE, csr_index, quantized_index
from test_kernels import exclusion, ragged

from sparcode.engine.dense import build_rows
from sparcode.kernels import dense_search as ds
from sparcode.kernels import reference as ref
from sparcode.kernels.keys import pack_keys

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TILINGS = [(2, 16, 1), (4, 16, 3), (16, 32, 4)]  # (block_q, block_n, group): partial blocks and groups


def all_sums(rows, bags):
    """(B, N) float32 sums by a loop over each bag here, NaN where no list holds the item."""
    codes, offsets, weights = bags
    out = torch.full((offsets.numel() - 1, rows.shape[1]), float("nan"))
    for q in range(offsets.numel() - 1):
        for t in range(int(offsets[q]), int(offsets[q + 1])):
            value = rows[int(codes[t])].float().cpu()
            if weights is not None:
                value = weights[t].cpu() * value
            out[q] = torch.where(out[q].isnan(), value, torch.where(value.isnan(), out[q], out[q] + value))
    return out


def expected_top(sums, ex_lists, k):
    """Top-k (scores, ids) of each row of ``sums`` by a sort here, excluded items dropped."""
    scores = torch.full((sums.shape[0], k), float("-inf"))
    ids = torch.full((sums.shape[0], k), -1, dtype=torch.int64)
    for q, row in enumerate(sums):
        items = [i for i in range(row.numel()) if not row[i].isnan() and i not in set(ex_lists[q])]
        items.sort(key=lambda i: (-float(row[i]), i))
        items = items[:k]
        ids[q, : len(items)] = torch.tensor(items, dtype=torch.int64)
        scores[q, : len(items)] = row[items]
    return scores, ids


def case(dtype, weighted, seed=0, n_items=700):
    rng = np.random.default_rng(seed + int(weighted))
    index = quantized_index(12, n_items, 60, seed=3, dtype=dtype, negative=dtype == torch.float32).to(DEVICE)
    bags = ragged(rng, 7, 12, 6, weighted)  # query 0 empty, query 1 repeats a code
    ex_lists = [[], [5, 77, 130], list(range(40)), [], [1, 2, 3], [], list(range(0, 140, 7))]
    return index, build_rows(index, dtype), bags, ex_lists


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_k2_equals_the_oracle_on_ragged_weighted_bags(dtype, weighted):
    index, rows, bags, ex_lists = case(dtype, weighted)
    sums = all_sums(rows, bags)
    ex_lists[3] = torch.sort(sums[3].nan_to_num(nan=float("-inf")), descending=True).indices[:30].tolist()  # its best
    ex = exclusion(ex_lists)
    floor = torch.full((7,), float("-inf"), device=DEVICE)
    want = expected_top(sums, ex_lists, 9)
    assert torch.equal(ref.dense_search(rows, *bags, floor, *ex, 9)[1].cpu(), want[1])
    ranks = 9 + ex[0].diff()
    for block_q, block_n, group in TILINGS:
        got = ds.dense_search(rows, *bags, floor, *ex, 9, block_n=block_n, block_q=block_q, group=group)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), (block_q, block_n, group)
        order = torch.argsort(bags[1].diff(), stable=True)
        raised, spread = ds.dense_floor(rows, *bags, floor, ranks, order, block_q=block_q, block_n=block_n)
        assert spread > 2 and torch.isfinite(raised).sum() >= 2, "the sample floor filters nothing: the case checks little"
    assert (got[1][0] == -1).all()  # an empty bag


@pytest.mark.parametrize("weighted", [False, True])
def test_k2_sample_floor_is_the_rank_of_a_subset_and_bounds_the_rank(weighted):
    index, rows, bags, ex_lists = case(torch.float32, weighted)
    ranks = 9 + exclusion(ex_lists)[0].diff()
    order = torch.argsort(bags[1].diff(), stable=True)
    floor = torch.full((7,), float("-inf"), device=DEVICE)
    sums = all_sums(rows, bags).nan_to_num(nan=float("-inf"))
    for block_q, block_n, group in TILINGS:
        got, spread = ds.dense_floor(rows, *bags, floor, ranks, order, block_q=block_q, block_n=block_n, group=group)
        want, ref_spread = ref.dense_floor(rows, *bags, floor, ranks, order, block_q=block_q, block_n=block_n)
        assert torch.equal(got.cpu(), want.cpu()) and spread == ref_spread
        assert spread > 1, "the sample covers every tile: the case checks little"
        for q in range(7):
            best = torch.sort(sums[q], descending=True).values
            if int(ranks[q]) <= best.numel():
                assert float(got[q]) <= float(best[int(ranks[q]) - 1])
        assert torch.isfinite(got).sum() >= 3, "no floor was raised: the case checks little"


def test_k2_floor_counts_each_query_s_excluded_items():
    """Each query excludes its own 60 best items, k = 3: a floor read at rank k instead of
    k + 60 would keep only excluded items."""
    index = quantized_index(8, 3000, 1500, seed=11, dtype=torch.float32).to(DEVICE)
    rows = build_rows(index, torch.float32)
    bags = (torch.tensor([1, 2, 3, 4, 5, 6], device=DEVICE), torch.tensor([0, 2, 3, 6], device=DEVICE), None)
    sums = all_sums(rows, bags)
    ex_lists = [torch.sort(row.nan_to_num(nan=float("-inf")), descending=True).indices[:60].tolist() for row in sums]
    ex = exclusion(ex_lists)
    floor = torch.full((3,), float("-inf"), device=DEVICE)
    got = ds.dense_search(rows, *bags, floor, *ex, 3, block_n=16, block_q=2)
    want = expected_top(sums, ex_lists, 3)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    _, spread = ds.dense_floor(rows, *bags, floor, 3 + ex[0].diff(), torch.arange(3, device=DEVICE), block_n=16)
    assert spread > 4, "the sample covers most tiles: the case checks little"


def test_k2_floor_keeps_the_given_floor_when_higher():
    index, rows, bags, _ = case(torch.float32, False)
    order = torch.argsort(bags[1].diff(), stable=True)
    high = torch.full((7,), 1e9, device=DEVICE)
    got, _ = ds.dense_floor(rows, *bags, high, torch.full((7,), 3, device=DEVICE), order, block_n=16)
    assert (got == 1e9).all()


@pytest.mark.parametrize("weighted", [False, True])
def test_k2_buckets_hold_every_survivor_and_count_the_rest(weighted):
    index, rows, bags, _ = case(torch.float32, weighted)
    order = torch.argsort(bags[1].diff(), stable=True)
    sums = all_sums(rows, bags)
    floor = torch.tensor([0.0, 1.0, -1.0, 2.0, float("-inf"), 0.5, 3.0], device=DEVICE)
    width = 32
    for block_q, block_n, group in TILINGS:
        keys, counts = ds.dense_buckets(rows, *bags, floor, order, width, block_q=block_q, block_n=block_n,
                                        group=group)
        want_keys, want_counts = ref.dense_buckets(rows, *bags, floor, order, width)
        assert torch.equal(counts, want_counts)
        for r, q in enumerate(order.tolist()):
            ids = torch.nonzero(sums[q] >= float(floor[q])).squeeze(1)
            every = set(pack_keys(sums[q][ids], ids).tolist())
            assert int(counts[r]) == len(every)
            mine = keys[r, : min(width, int(counts[r]))].cpu()
            assert set(mine.tolist()) <= every and len(set(mine.tolist())) == mine.numel()
            if len(every) <= width:
                assert torch.equal(torch.sort(mine, descending=True).values, want_keys[r, : len(every)].cpu())
        assert (counts > width).any() and (counts <= width).any(), "the case must overflow some buckets, not all"


def test_k2_counters_do_not_wrap_and_nothing_is_stored_past_a_bucket():
    """Counters already near 2**31 (as after a huge count): further survivors must be
    counted and land past the bucket, not wrap negative and store out of bounds."""
    from sparcode.kernels.common import new_counters

    index, rows, bags, _ = case(torch.float32, False)
    order = torch.arange(7, device=DEVICE)
    floor = torch.full((7,), float("-inf"), device=DEVICE)
    _, found = ref.dense_buckets(rows, *bags, floor, order, 1)
    start, width = 2**31 - 2, 4
    counts = new_counters(7, DEVICE).fill_(start)
    keys = torch.full((7 * width + 64,), 7, dtype=torch.int64, device=DEVICE)
    tiles = torch.arange(-(-rows.shape[1] // 16), device=DEVICE)
    unused = torch.zeros(1, dtype=torch.float32, device=DEVICE)
    ds._launch(rows, *bags, floor, order, tiles, unused, keys, counts, width, False, 4, 16, 2)
    assert torch.equal(counts - start, found) and (keys == 7).all()
    counts = new_counters(7, DEVICE)
    ds._launch(rows, *bags, floor, order, tiles, unused, keys, counts, width, False, 4, 16, 2)
    assert (keys[7 * width :] == 7).all(), "a store past the last bucket"


def test_k2_searches_overflowing_buckets_again_and_splits_by_the_workspace(monkeypatch):
    index, rows, bags, ex_lists = case(torch.bfloat16, True, seed=5)
    ex = exclusion(ex_lists)
    floor = torch.full((7,), float("-inf"), device=DEVICE)
    want = ref.dense_search(rows, *bags, floor, *ex, 9)
    widths = []
    buckets = ds.dense_buckets

    def recorded(rows, codes, offsets, weights, floor, order, width, **kwargs):
        widths.append((order.numel(), width))
        return buckets(rows, codes, offsets, weights, floor, order, width, **kwargs)

    monkeypatch.setattr(ds, "dense_buckets", recorded)
    monkeypatch.setattr(ds, "BUCKET_SLACK", 0.01)  # the first buckets hold 16: most queries find more
    got = ds.dense_search(rows, *bags, floor, *ex, 9, block_n=16, block_q=4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert widths[0] == (7, 16) and len(widths) == 2 and widths[1][1] > 16
    widths.clear()
    got = ds.dense_search(rows, *bags, floor, *ex, 9, block_n=16, block_q=4, max_survivors=40)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(n * width <= 40 or n == 1 for n, width in widths) and len(widths) > 3


def test_k2_edge_cases():
    # code 1 is empty; query 2 holds only empty lists, query 4 no codes; zero and negative scores are candidates
    index = csr_index([[(0, 1.0), (5, 0.0), (9, -0.5)], [], [(5, 1.0), (6, 3.0)]], n_items=10).to(DEVICE)
    rows = build_rows(index, torch.float32)
    codes = torch.tensor([0, 0, 2, 1, 1, 1, 2, 1, 0, 0, 2], device=DEVICE)
    offsets = torch.tensor([0, 3, 6, 9, 11, 11], device=DEVICE)  # query 3 is query 2 again (its top item excluded)
    floor = torch.full((5,), float("-inf"), device=DEVICE)
    ex_lists = [[], [], [0], [6], []]
    for k in (1, 6, 12):  # the top item excluded at k = 1; k above the candidates and the items
        got = ds.dense_search(rows, codes, offsets, None, floor, *exclusion(ex_lists), k, block_n=4, block_q=2)
        want = ref.dense_search(rows, codes, offsets, None, floor, *exclusion(ex_lists), k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if k == 1:
            assert got[1][:, 0].tolist() == [6, -1, 6, 0, -1]
    assert got[1][0].tolist()[:5] == [6, 0, 5, 9, -1] and got[0][0, :4].tolist() == [3.0, 2.0, 1.0, -1.0]
    every = ds.dense_search(rows, codes, offsets, None, floor, *exclusion([[0, 5, 6, 9]] * 5), 3, block_n=4)
    assert (every[1] == -1).all() and (every[0] == float("-inf")).all()  # every candidate excluded
    none = ds.dense_search(rows, codes[:0], offsets[:1], None, floor[:0], *exclusion([]), 3)
    assert none[1].shape == (0, 3)
    assert (ds.dense_search(rows, codes, offsets, None, floor, *exclusion(ex_lists), 0, block_n=4)[1]).shape == (5, 0)


def test_k2_scratch_bytes_match_the_buffers_it_sizes():
    # N = 1M, k = 100, tiles of 1,024: 62 sampled tiles (one in 16), buckets of 2 x 100 x 977 / 62 = 3,152 -> 4,096
    assert ds.scratch_bytes(1_000_000, 100, 1024) == 4 * 62 * 1024 + 24 * 4096
    assert ds.scratch_bytes(100, 1000, 16) == 4 * 7 * 16 + 24 * 100  # every tile sampled; a bucket of N at most


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_k2_realistic_gpu(dtype):
    from sparcode.engine.synthetic import random_codes

    index = quantized_index(256, 50_000, 5_000, seed=15, dtype=dtype).to("cuda")
    rows = build_rows(index, dtype)
    codes = random_codes(64, 8, 256, seed=16, device="cuda").reshape(-1)
    offsets = torch.arange(65, device="cuda") * 8
    floor = torch.full((64,), float("-inf"), device="cuda")
    ex = exclusion([list(range(q, 50_000, 97)) for q in range(64)], "cuda")
    got = ds.dense_search(rows, codes, offsets, None, floor, *ex, 100)
    want = ref.dense_search(rows, codes, offsets, None, floor, *ex, 100)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
