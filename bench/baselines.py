"""The methods SparCode is measured against: two-tower brute force, faiss, and brute-force
all-to-all scoring (the model class SparCode serves, evaluated for every item)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from sparcode.training.defaults import GPU_HIDDEN
from sparcode.training.models import Scorer

DIM = 64


def clustered_vectors(n: int, *, centers: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-mixture vectors: item embeddings are clustered in practice, and IVF is
    only meaningful on clustered data. ``spread`` is the noise scale per dimension
    (the centers are standard normal)."""
    picks = rng.integers(0, centers.shape[0], size=n)
    return (centers[picks] + spread * rng.standard_normal((n, centers.shape[1]))).astype(np.float32)


def two_tower(items: torch.Tensor, *, budget_bytes: int = 256 * 2**20) -> Callable[[torch.Tensor, int], tuple]:
    """Exact maximum inner product: query chunks x item matrix, then ``torch.topk``.
    bfloat16 on CUDA, float32 on CPU; chunks keep the score matrix under budget."""
    dtype = torch.bfloat16 if items.is_cuda else torch.float32
    matrix = items.to(dtype)
    n_items = matrix.shape[0]
    rows = max(1, budget_bytes // (n_items * 4))

    def search(queries: torch.Tensor, k: int) -> tuple:
        parts = [torch.topk(q.to(dtype) @ matrix.T, min(k, n_items), dim=1) for q in queries.split(rows)]
        return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])

    return search


def faiss_flat(items: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    return index


def faiss_ivfpq(items: np.ndarray, nlist: int, m: int, *, seed: int = 0):
    """IVF{nlist},PQ{m} with inner product, trained on at most 64 x nlist vectors."""
    import faiss

    index = faiss.index_factory(items.shape[1], f"IVF{nlist},PQ{m}", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = items[rng.choice(items.shape[0], size=min(items.shape[0], 64 * nlist), replace=False)]
    index.cp.min_points_per_centroid = 1
    index.cp.max_points_per_centroid = 64
    index.pq.cp.max_points_per_centroid = 64
    index.train(sample)
    index.add(items)
    return index


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / |truth| over rows."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def tune_nprobe(index, queries: np.ndarray, truth: np.ndarray, k: int, target: float = 0.9) -> tuple[int, float]:
    """The smallest power-of-two nprobe whose Recall@k against exact search is >= target."""
    nprobe, recall = 1, 0.0
    while nprobe <= index.nlist:
        index.nprobe = nprobe
        recall = recall_at(index.search(queries, k)[1], truth)
        if recall >= target:
            return nprobe, recall
        nprobe *= 2
    return index.nlist, recall


def all_to_all(n_items: int, device: str, *, chunk: int = 16384, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Score every item for each query: sum over its T tokens of ReLU(scorer + b). The
    item half of the first layer is computed once (as any serious implementation
    would), the rest runs for every (token, item) pair."""
    torch.manual_seed(seed)
    scorer = Scorer(DIM, GPU_HIDDEN).to(device).eval()  # the paper's MLP widths + our product input
    items = torch.randn(n_items, DIM, device=device)
    with torch.no_grad():
        item_part = scorer.item_in(items)

    @torch.no_grad()
    def score(tokens: torch.Tensor) -> torch.Tensor:  # (Q, T, DIM) -> (Q, N)
        out = torch.zeros(tokens.shape[0], n_items, device=device)
        for q in range(tokens.shape[0]):
            token_part = scorer.token_in(tokens[q : q + 1])  # (1, T, 256)
            for start in range(0, n_items, chunk):
                stop = start + chunk
                raw = scorer(tokens[q : q + 1], items[start:stop], token_part, item_part[start:stop])  # (1, T, M)
                out[q, start:stop] = torch.relu(raw[0] - 0.1).sum(0)
        return out

    return score


def history_matrix(codes: torch.Tensor, offsets: torch.Tensor, n_items: int):
    """Users' histories (bags of item codes) as a scipy CSR of ones (B x N)."""
    import scipy.sparse

    return scipy.sparse.csr_matrix((np.ones(codes.numel(), dtype=np.float32), codes.cpu().numpy(), offsets.cpu().numpy()),
                                   shape=(offsets.numel() - 1, n_items))


def scipy_item_codes(index) -> Callable[[torch.Tensor, torch.Tensor, int], list[np.ndarray]]:
    """What an item-to-item user runs with scipy: history CSR @ the capped (N x N) CSR, then
    per row the history left out and a partial sort of what remains."""
    import scipy.sparse

    matrix = scipy.sparse.csr_matrix((index.scores.float().numpy(), index.items.numpy(), index.indptr.numpy()),
                                     shape=(index.n_codes, index.n_items))

    def search(codes: torch.Tensor, offsets: torch.Tensor, k: int) -> list[np.ndarray]:
        product = history_matrix(codes, offsets, index.n_items) @ matrix
        history, starts = codes.numpy(), offsets.numpy()
        out = []
        for row in range(product.shape[0]):
            lo, hi = product.indptr[row], product.indptr[row + 1]
            items, values = product.indices[lo:hi], product.data[lo:hi]
            keep = ~np.isin(items, history[starts[row] : starts[row + 1]])
            items, values = items[keep], values[keep]
            if items.size > k:
                top = np.argpartition(-values, k)[:k]
                items, values = items[top], values[top]
            out.append(items[np.lexsort((items, -values))])
        return out

    return search


def dense_item_codes(index, *, block: int = 1024) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """Dense EASE scoring: a block of users' sparse histories @ the dense (N x N) item-item
    matrix, history masked, ``torch.topk``. Holds N x N float32 (6.7 GB at N = 41,000)."""
    n_items = index.n_items
    dense = torch.zeros(n_items, n_items, dtype=torch.float32, device=index.device)
    rows = torch.repeat_interleave(torch.arange(n_items, device=index.device), index.lengths)
    dense[rows, index.items.to(torch.int64)] = index.scores.float()
    del rows

    def search(codes: torch.Tensor, offsets: torch.Tensor, k: int) -> torch.Tensor:
        n_queries = offsets.numel() - 1
        out = []
        for lo in range(0, n_queries, block):
            hi = min(n_queries, lo + block)
            part = offsets[lo : hi + 1] - offsets[lo]
            items = codes[int(offsets[lo]) : int(offsets[hi])]
            with warnings.catch_warnings():  # torch's beta-state notice for sparse CSR
                warnings.simplefilter("ignore", UserWarning)
                users = torch.sparse_csr_tensor(part, items, torch.ones(items.numel(), device=codes.device),
                                                size=(hi - lo, n_items))
            scores = users @ dense
            owner = torch.repeat_interleave(torch.arange(hi - lo, device=codes.device), part.diff())
            scores[owner, items] = float("-inf")
            out.append(torch.topk(scores, k, dim=1).indices)
        return torch.cat(out)

    return search
