"""Export a trained SparCode model to a CodeIndex: score every (code, item) pair in
chunks, apply the ReLU-bias sparsity rule, keep the non-zero scores as posting lists.
Several rules (a sparsity curve) share one scoring pass: the scorer is the cost."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sparcode.engine import CodeIndex

from .models import SparCode


@dataclass(frozen=True)
class ExportRule:
    """Which scores an index keeps. ``density`` None: the model's own bias; a fraction in
    (0, 1): the bias that keeps that fraction (estimated from a sample of codes x items);
    1: every pair, as softplus(scorer + b), the unsparsified model. ``cap`` keeps at most
    that many items per code (its highest scores), bounding the longest posting list."""

    density: float | None = None
    cap: int | None = None

    def __post_init__(self) -> None:
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density: expected a fraction in (0, 1], got {self.density}")
        if self.cap is not None and (isinstance(self.cap, bool) or not isinstance(self.cap, int) or self.cap < 1):
            raise ValueError(f"cap: expected a positive int (items per code), got {self.cap!r}")

    @classmethod
    def top(cls, fraction: float, n_items: int) -> ExportRule:
        """Each code keeps its top ``fraction`` x N items with the training activation:
        none dropped by a bias, so no code's list is empty (at 1% on Gowalla it kept
        Recall@20 within 2.1% of the unsparsified index where one bias lost 55-69%)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction: expected a fraction in (0, 1], got {fraction}")
        return cls(1, cap=max(1, round(fraction * n_items)))


def export_index(model: SparCode, item_features: torch.Tensor | None, n_items: int, *, density: float | None = None,
                 cap: int | None = None, budget_bytes: int | None = None, seed: int = 0,
                 progress: bool = False) -> tuple[CodeIndex, dict]:
    """The index of ReLU(scorer(code vector, item) + b) over all V codes x N items, under
    one ``ExportRule(density, cap)``: see ``export_indexes``."""
    return export_indexes(model, item_features, n_items, [ExportRule(density, cap)], budget_bytes=budget_bytes,
                          seed=seed, progress=progress)[0]


@torch.no_grad()
def export_indexes(model: SparCode, item_features: torch.Tensor | None, n_items: int, rules: Sequence[ExportRule], *,
                   budget_bytes: int | None = None, seed: int = 0,
                   progress: bool = False) -> list[tuple[CodeIndex, dict]]:
    """One index and its report per rule, from a single pass over all V codes x N items.

    Density 1 keeps softplus(scorer + b) for every pair: the smooth function training
    optimises (raw scores without an activation rank worse than any sparse index:
    synthetic Recall@20 0.086 against 0.239 at 10% density, docs/accuracy.md). Scores are stored
    as float16; values that round to 0 are dropped. The first scorer layer is computed
    once for all codes and once for all items; a scorer whose MLP output is constant (an
    untrained warm start) is scored by its dot product alone. The indexes are built on
    the model's device (a GPU export stays on the GPU, ready for ``Engine``) and held
    together until the pass ends; ``CodeIndex.save`` writes one out. Each report's
    ``seconds`` is the whole pass, shared by its ``rules_in_pass`` rules.
    """
    if not rules:
        raise ValueError("rules: expected at least one ExportRule")
    start = time.perf_counter()
    model.eval()
    quantizer = model.encoder.quantizer
    device = quantizer.codebooks.device
    code_vectors = quantizer.code_vectors()  # (V, d)
    item_vectors = model.items(torch.arange(n_items, device=device), item_features)  # (N, d)
    n_codes, scorer = len(code_vectors), model.scorer
    if budget_bytes is None:  # scratch per chunk of codes: bigger chunks, fewer launches on a GPU
        budget_bytes = 4 * 2**30 if device.type == "cuda" else 256 * 2**20

    if scorer.mlp_is_constant():  # the same scores without the MLP's (c, N, h) passes
        per_pair = 32  # the raw score, its activated copy and the keep masks

        def raw(codes: torch.Tensor, items: slice | torch.Tensor = slice(None)) -> torch.Tensor:  # (c, N) or (c, len(items))
            return scorer.dot(code_vectors[codes], item_vectors[items]) + scorer.rest[-1].bias
    else:
        token_part = scorer.token_in(code_vectors)  # (V, h)
        item_part = scorer.item_in(item_vectors)  # (N, h)
        per_pair = (token_part.shape[1] + code_vectors.shape[1]) * 4 * 2

        def raw(codes: torch.Tensor, items: slice | torch.Tensor = slice(None)) -> torch.Tensor:
            return scorer(code_vectors[codes].unsqueeze(1), item_vectors[items], token_part[codes].unsqueeze(1),
                          item_part[items])[:, 0]

    chunk = max(1, budget_bytes // (n_items * per_pair))

    values = None  # the seeded sample of raw scores that density rules take their quantile from
    biases: list[float | None] = []
    for rule in rules:
        if rule.density is None:
            biases.append(float(model.bias))
        elif rule.density == 1:  # no sparsification: the training activation on every pair
            biases.append(None)
        else:
            if values is None:
                values = score_sample(raw, n_codes, n_items, chunk, seed, device)
            biases.append(-float(torch.quantile(values, 1 - rule.density)))
    postings = [Postings(device, n_codes, n_codes * min(rule.cap or n_items, n_items)) for rule in rules]
    for codes in tqdm(torch.arange(n_codes, device=device).split(chunk), desc="export", unit="chunk",
                      disable=not progress, leave=False):
        s = raw(codes)
        activated: dict[float | None, tuple[torch.Tensor, torch.Tensor]] = {}  # rules of one bias share it
        for rule, bias, post in zip(rules, biases, postings):
            if bias not in activated:
                if bias is None:
                    s16 = F.softplus(s + model.bias).to(torch.float16)
                    activated[bias] = s16, torch.ones_like(s16, dtype=torch.bool)
                else:
                    s16 = torch.relu(s + bias).to(torch.float16)
                    activated[bias] = s16, s16 > 0
            s16, keep = activated[bias]
            if rule.cap is not None and rule.cap < n_items:
                keep = keep & torch.zeros_like(keep).scatter_(1, torch.topk(s, rule.cap, dim=1).indices, True)
            post.append(s16, keep)
    seconds = time.perf_counter() - start
    out = []
    for bias, post in zip(biases, postings):
        index = post.build(n_items, quantizer.codebooks.detach().float(), model.encoder.tokenizer.n_tokens)
        out.append((index, {"seconds": seconds, "rules_in_pass": len(rules), "density": index.nnz / (n_codes * n_items),
                            "nnz": index.nnz, "index_bytes": index.nbytes, "bias": bias,
                            "longest_list": int((index.indptr[1:] - index.indptr[:-1]).max())}))
    return out


class Postings:
    """The kept (item, score) pairs of one rule, a chunk of codes at a time, copied into
    blocks of ``BLOCK_PAIRS`` pairs as they come.

    A chunk's pieces are small (on a CPU, 6 codes x 41k items for Gowalla): kept until the
    build, they and the per-chunk offsets filled the allocator's heap, which it cannot
    give back, and the set of Gowalla indexes (4.5 GB) peaked at ~20 GB resident. A block
    (192 MB) is its own mapping, returned to the system when freed; the pieces are freed
    at once and the offsets go into one array (the same five Gowalla indexes, 4.2 GB:
    5.6 GB peak; docs/performance.md)."""

    BLOCK_PAIRS = 2**25

    def __init__(self, device: torch.device, n_codes: int, max_pairs: int) -> None:
        self.device = device
        self.block_pairs = max(1, min(self.BLOCK_PAIRS, max_pairs))
        self.indptr = torch.zeros(n_codes + 1, dtype=torch.int64, device=device)
        self.codes = 0  # codes appended so far
        self.items: list[torch.Tensor] = []  # blocks; the last one filled up to ``fill``
        self.scores: list[torch.Tensor] = []
        self.fill = self.block_pairs
        self.total = 0

    def append(self, s16: torch.Tensor, keep: torch.Tensor) -> None:
        """One chunk: (codes, N) scores and the mask of those kept."""
        rows, cols = torch.nonzero(keep, as_tuple=True)
        items, scores = cols.to(torch.int32), s16[rows, cols]
        done = 0
        while done < items.numel():
            if self.fill == self.block_pairs:
                self.items.append(torch.empty(self.block_pairs, dtype=torch.int32, device=self.device))
                self.scores.append(torch.empty(self.block_pairs, dtype=torch.float16, device=self.device))
                self.fill = 0
            n = min(items.numel() - done, self.block_pairs - self.fill)
            self.items[-1][self.fill:self.fill + n] = items[done:done + n]
            self.scores[-1][self.fill:self.fill + n] = scores[done:done + n]
            self.fill += n
            done += n
        counts = torch.bincount(rows, minlength=keep.shape[0])
        self.indptr[self.codes + 1:self.codes + 1 + keep.shape[0]] = self.total + counts.cumsum(0)
        self.codes += keep.shape[0]
        self.total += items.numel()

    def build(self, n_items: int, codebooks: torch.Tensor, n_tokens: int) -> CodeIndex:
        """The CSR index; each block is freed as soon as it is copied into it."""
        indptr = self.indptr
        items = join(self.items, self.total, torch.int32, self.device)
        scores = join(self.scores, self.total, torch.float16, self.device)
        return CodeIndex.from_postings(indptr, items, scores, n_items, codebooks=codebooks, n_tokens=n_tokens)


def join(blocks: list[torch.Tensor], total: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The first ``total`` values of the blocks, emptying the list as they are copied:
    the peak is the result plus one block, not twice the result."""
    out = torch.empty(total, dtype=dtype, device=device)
    start = 0
    while blocks:
        block = blocks.pop(0)
        n = min(block.numel(), total - start)
        out[start:start + n] = block[:n]
        start += n
    return out


def score_sample(raw: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_codes: int, n_items: int,
                 chunk: int, seed: int, device: torch.device) -> torch.Tensor:
    """Raw scores of a seeded sample of codes x 4,096 items, as many values as
    torch.quantile takes (2**24): the cut varies from code to code, and 48 codes x all
    items missed a 0.1% target by 24% on Gowalla (41k items)."""
    gen = torch.Generator().manual_seed(seed)
    some_items = torch.randperm(n_items, generator=gen)[:4096].to(device)
    sample = torch.randperm(n_codes, generator=gen)[: 2**24 // len(some_items)].to(device)
    return torch.cat([raw(c, some_items).reshape(-1) for c in sample.split(chunk * n_items // len(some_items))]).float()
