"""``CodeIndex``: code-keyed posting lists (CSR) with their scores, on one device."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch

from .arrays import to_torch
from .storage import load_index, save_index
from .validate import check_codebooks, check_item_ids, check_postings, fail

Array = Any  # a torch tensor, numpy array or cupy array


class CodeIndex:
    """Posting lists keyed by code: for code v, ``items[indptr[v]:indptr[v+1]]`` (strictly
    increasing item ids in [0, N)) with their precomputed ``scores``.

    Build one with :meth:`from_postings`, :meth:`load`, or ``sparcode.engine.synthetic``.
    Layouts that a search backend derives from the CSR (a float32 sparse matrix, block
    offsets, ...) are cached per index with :meth:`derived` and counted in :attr:`nbytes`.
    """

    def __init__(
        self,
        indptr: torch.Tensor,
        items: torch.Tensor,
        scores: torch.Tensor,
        n_items: int,
        codebooks: torch.Tensor | None,
        item_ids: torch.Tensor | None,
        n_tokens: int | None,
    ) -> None:
        self.indptr = indptr
        self.items = items
        self.scores = scores
        self.n_items = n_items
        self.codebooks = codebooks
        self.item_ids = item_ids
        self.n_tokens = n_tokens
        self._derived: dict[Hashable, object] = {}

    @classmethod
    def from_postings(
        cls,
        indptr: Array,
        items: Array,
        scores: Array,
        n_items: int,
        *,
        codebooks: Array | None = None,
        item_ids: Array | None = None,
        n_tokens: int | None = None,
    ) -> CodeIndex:
        """Validate and wrap a CSR of posting lists (nothing is sorted or repaired).

        ``indptr`` (V + 1) int64, ``items`` (nnz) int32, ``scores`` (nnz) float16,
        bfloat16 or float32, all on one device; ``codebooks`` (P, C, d_sub) with
        C**P == V, or (T, P, C, d_sub) with T * C**P == V (one quantizer per token
        position); ``item_ids`` (N) unique int64 external ids; ``n_tokens`` the T that
        queries must have. Each may be a torch tensor, a numpy array (shared, not
        copied) or a cupy array (through DLPack, zero copy).
        """
        indptr, items, scores = (to_torch(a, name)[0] for a, name in
                                 ((indptr, "indptr"), (items, "items"), (scores, "scores")))
        codebooks = None if codebooks is None else to_torch(codebooks, "codebooks")[0]
        item_ids = None if item_ids is None else to_torch(item_ids, "item_ids")[0]
        names = {f: f for f in ("indptr", "items", "scores", "n_items")}
        check_postings(indptr, items, scores, n_items, names)
        devices = {t.device for t in (indptr, items, scores)}
        if codebooks is not None:
            check_codebooks(codebooks, indptr.numel() - 1, "codebooks")
            devices.add(codebooks.device)
        if item_ids is not None:
            check_item_ids(item_ids, n_items, "item_ids")
            devices.add(item_ids.device)
        if len(devices) > 1:
            fail("indptr", f"all tensors must be on one device, got {sorted(map(str, devices))}")
        if n_tokens is not None and (not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1):
            fail("n_tokens", f"expected a positive int or None, got {n_tokens!r}")
        return cls(indptr, items, scores, n_items, codebooks, item_ids, n_tokens)

    @property
    def n_codes(self) -> int:
        """V, the number of codes (posting lists)."""
        return self.indptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.items.numel()

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    @property
    def lengths(self) -> torch.Tensor:
        """Posting length of every code, (V,) int64."""
        return self.indptr[1:] - self.indptr[:-1]

    def derived(self, name: Hashable, build: Callable[[CodeIndex], object]) -> object:
        """A layout derived from the CSR, built once per index and device."""
        if name not in self._derived:
            self._derived[name] = build(self)
        return self._derived[name]

    def derived_names(self) -> set[Hashable]:
        """The names of the layouts built so far."""
        return set(self._derived)

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: the CSR, codebooks, external ids and derived layouts."""
        tensors = [self.indptr, self.items, self.scores, self.codebooks, self.item_ids]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        for value in self._derived.values():
            total += _layout_bytes(value)
        return total

    def to(self, device: torch.device | str) -> CodeIndex:
        """A copy on ``device`` (self if already there); derived layouts are rebuilt lazily."""
        device = torch.device(device)
        if device == self.device:
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return CodeIndex(
            move(self.indptr), move(self.items), move(self.scores), self.n_items,
            move(self.codebooks), move(self.item_ids), self.n_tokens,
        )

    def stats(self) -> dict[str, object]:
        """Sizes and shape of the posting lists (V, N, nnz, density, lengths, bytes)."""
        lengths = self.lengths
        return {
            "n_codes": self.n_codes,
            "n_items": self.n_items,
            "nnz": self.nnz,
            "density": self.nnz / (self.n_codes * self.n_items),
            "mean_posting_length": self.nnz / self.n_codes,
            "max_posting_length": int(lengths.max()),
            "empty_posting_lists": int((lengths == 0).sum()),
            "n_tokens": self.n_tokens,
            "score_dtype": str(self.scores.dtype).replace("torch.", ""),
            "has_codebooks": self.codebooks is not None,
            "has_item_ids": self.item_ids is not None,
            "nbytes": self.nbytes,
            "device": str(self.device),
        }

    def save(self, path: str | Path, *, overwrite: bool = False, encoder: torch.nn.Module | None = None) -> None:
        """Write the index directory (manifest.json + index.safetensors, and the query
        encoder's weights and config when given) atomically."""
        tensors = {"indptr": self.indptr, "items": self.items, "scores": self.scores, "codebooks": self.codebooks,
                   "item_ids": self.item_ids}
        save_index(Path(path), tensors, self.n_items, self.n_tokens, overwrite=overwrite, encoder=encoder)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None, mmap: bool = True) -> CodeIndex:
        """Read and fully validate an index directory; never runs code from it."""
        manifest, t = load_index(Path(path), mmap=mmap)
        index = cls(t["indptr"], t["items"], t["scores"], manifest["n_items"], t.get("codebooks"), t.get("item_ids"),
                    manifest["n_tokens"])
        return index if device is None else index.to(device)

    def __repr__(self) -> str:
        return (
            f"CodeIndex(V={self.n_codes}, N={self.n_items}, nnz={self.nnz}, "
            f"scores={str(self.scores.dtype).replace('torch.', '')}, device={self.device})"
        )


def _layout_bytes(value: object) -> int:
    """Bytes of a derived layout: a tensor (dense or sparse CSR), a scipy sparse matrix
    or a tuple of them; anything else (a flag) counts 0."""
    if isinstance(value, tuple):
        return sum(_layout_bytes(v) for v in value)
    if isinstance(value, torch.Tensor):
        if value.layout == torch.sparse_csr:
            return _layout_bytes((value.crow_indices(), value.col_indices(), value.values()))
        return value.numel() * value.element_size()
    if all(hasattr(value, a) for a in ("data", "indices", "indptr")):  # scipy sparse
        return sum(getattr(value, a).nbytes for a in ("data", "indices", "indptr"))
    return 0
