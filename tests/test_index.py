"""CodeIndex construction, validation, stats and device moves."""

import pytest
import torch
from helpers import csr_index, quantized_index

from sparcode.engine import CodeIndex, Engine
from sparcode.engine.synthetic import random_codes, random_index


def postings(indptr, items, scores=None):
    indptr = torch.tensor(indptr, dtype=torch.int64)
    items = torch.tensor(items, dtype=torch.int32)
    scores = torch.ones(items.numel()) if scores is None else torch.tensor(scores, dtype=torch.float32)
    return indptr, items, scores


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (postings([0, 2, 3], [1, 1, 0]), "items: posting list of code 0 must be strictly increasing: a duplicate item (1 then 1)"),
        (postings([0, 1, 3], [1, 3, 2]), "items: posting list of code 1 must be strictly increasing: items out of order (3 then 2)"),
        (postings([0, 1, 2], [1, 9]), "items: item 9 of code 1 is outside [0, 5)"),
        (postings([0, 1, 2], [1, -2]), "items: item -2 of code 1 is outside [0, 5)"),
        (postings([0, 1, 2], [1, 2], [1.0, float("nan")]), "scores: non-finite score nan in the posting list of code 1"),
        (postings([1, 1, 2], [1, 2]), "indptr: must start at 0"),
        (postings([0, 1, 3], [1, 2]), "indptr: must end at nnz = 2"),
        (postings([0, 2, 1, 2], [1, 2]), "indptr: must be non-decreasing; decreases at code 1"),
        ((torch.tensor([0, 1]), torch.tensor([1], dtype=torch.int64), torch.ones(1)), "items: expected dtype int32, got int64"),
        ((torch.tensor([0, 1]), torch.tensor([1], dtype=torch.int32), torch.ones(1, dtype=torch.float64)), "scores: expected dtype float16"),
        ((torch.tensor([0, 1]), torch.tensor([1], dtype=torch.int32), torch.ones(2)), "scores: has 2 entries but items has 1"),
    ],
)
def test_from_postings_rejects_bad_csr(args, message):
    with pytest.raises(ValueError) as info:
        CodeIndex.from_postings(*args, 5)
    assert message in str(info.value)


@pytest.mark.parametrize("block", [1, 2, 3, 1 << 24])
def test_from_postings_checks_across_blocks(block, monkeypatch):
    """The CSR check runs in blocks of postings: a fault on either side of a block edge is found."""
    import sparcode.engine.validate as validate

    monkeypatch.setattr(validate, "CHECK_BLOCK", block)
    indptr = [0, 3, 3, 6]  # codes 0 and 2 hold 3 items, code 1 none
    CodeIndex.from_postings(*postings(indptr, [0, 2, 4, 1, 3, 4]), 5)  # a new list may restart lower
    for items, code, kind in (([0, 2, 4, 1, 4, 3], 2, "items out of order (4 then 3)"),
                              ([0, 2, 2, 1, 3, 4], 0, "a duplicate item (2 then 2)"),
                              ([0, 1, 2, 3, 3, 4], 2, "a duplicate item (3 then 3)")):
        with pytest.raises(ValueError, match=rf"code {code} must be strictly increasing: {kind.replace('(', '[(]').replace(')', '[)]')}"):
            CodeIndex.from_postings(*postings(indptr, items), 5)
    with pytest.raises(ValueError, match="non-finite score inf in the posting list of code 2"):
        CodeIndex.from_postings(*postings(indptr, [0, 2, 4, 1, 3, 4], [1, 1, 1, 1, 1, float("inf")]), 5)


def test_from_postings_checks_options():
    indptr, items, scores = postings([0, 1, 2], [1, 2])
    with pytest.raises(ValueError, match="n_items: expected a positive int"):
        CodeIndex.from_postings(indptr, items, scores, 0)
    with pytest.raises(ValueError, match="item_ids: external item ids must be unique"):
        CodeIndex.from_postings(indptr, items, scores, 3, item_ids=torch.tensor([4, 4, 5]))
    with pytest.raises(ValueError, match="item_ids: expected 3 external ids"):
        CodeIndex.from_postings(indptr, items, scores, 3, item_ids=torch.tensor([4, 5]))
    with pytest.raises(ValueError, match=r"codebooks: shape \(2, 3, 4\) gives C\*\*P = 9 codes, the index has 2"):
        CodeIndex.from_postings(indptr, items, scores, 3, codebooks=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"codebooks: shape \(2, 1, 3, 4\) gives T x C\*\*P = 2 x 3 = 6 codes"):
        CodeIndex.from_postings(indptr, items, scores, 3, codebooks=torch.zeros(2, 1, 3, 4))  # one per token
    per_token = CodeIndex.from_postings(indptr, items, scores, 3, codebooks=torch.zeros(2, 1, 1, 4))  # 2 x 1**1 codes
    assert per_token.codebooks.shape == (2, 1, 1, 4)
    with pytest.raises(ValueError, match="n_tokens: expected a positive int"):
        CodeIndex.from_postings(indptr, items, scores, 3, n_tokens=0)
    with pytest.raises(TypeError, match="indptr: expected a torch tensor, numpy array or cupy array, got list"):
        CodeIndex.from_postings([0, 1, 2], items, scores, 3)
    with pytest.raises(ValueError, match="items: expected dtype int32, got int64"):
        CodeIndex.from_postings(indptr.numpy(), items.numpy().astype("int64"), scores.numpy(), 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_from_postings_takes_numpy_arrays(dtype):
    index = quantized_index(16, 50, 6, seed=4, dtype=dtype, codebooks=torch.randn(2, 4, 8), item_ids=torch.randperm(50) + 10)
    arrays = {name: getattr(index, name).numpy() for name in ("indptr", "items", "scores", "codebooks", "item_ids")}
    from_numpy = CodeIndex.from_postings(arrays["indptr"], arrays["items"], arrays["scores"], index.n_items,
                                         codebooks=arrays["codebooks"], item_ids=arrays["item_ids"], n_tokens=index.n_tokens)
    for name in ("indptr", "items", "scores", "codebooks", "item_ids"):
        got, want = getattr(from_numpy, name), getattr(index, name)
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), name
    codes = torch.tensor([[1, 2, 3, 3], [0, 5, 9, 15]])
    assert torch.equal(Engine(from_numpy, backend="torch").search(codes, k=7).ids,
                       Engine(index, backend="torch").search(codes, k=7).ids)


def test_stats_and_nbytes():
    index = csr_index([[(0, 1.0), (2, 1.0)], [], [(1, 1.0)]], n_items=4)
    stats = index.stats()
    assert stats["n_codes"] == 3 and stats["n_items"] == 4 and stats["nnz"] == 3
    assert stats["density"] == pytest.approx(3 / 12)
    assert stats["mean_posting_length"] == 1.0 and stats["max_posting_length"] == 2
    assert stats["empty_posting_lists"] == 1
    assert index.nbytes == 4 * 8 + 3 * 4 + 3 * 4
    index.derived("extra", lambda ix: torch.zeros(10, dtype=torch.float32))
    assert index.nbytes == 4 * 8 + 3 * 4 + 3 * 4 + 40


def test_to_same_device_is_identity_and_synthetic_is_deterministic():
    index = random_index(64, 100, 8, seed=7)
    assert index.to("cpu") is index
    again = random_index(64, 100, 8, seed=7)
    assert torch.equal(index.items, again.items) and torch.equal(index.scores, again.scores)
    assert not torch.equal(index.items, random_index(64, 100, 8, seed=8).items)
    assert torch.equal(random_codes(5, 3, 64, seed=1), random_codes(5, 3, 64, seed=1))


def test_synthetic_skew_makes_popular_codes_long_and_frequent():
    index = random_index(1024, 5000, 20, skew=0.8, seed=0)
    codes = random_codes(20000, 1, 1024, skew=0.8, seed=0).squeeze(1)
    counts = torch.bincount(codes, minlength=1024)
    longest = torch.argsort(index.lengths, descending=True)[:10]
    assert counts[longest].float().mean() > 5 * counts.float().mean()
    assert abs(index.nnz / 1024 - 20) < 3
