"""``Engine``: batched top-k search over a ``CodeIndex``."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from .arrays import Kind, from_torch, to_torch
from .bags import Bags, to_bags
from .exclude import normalize_exclude
from .index import CodeIndex
from .plan import Plan, chunks
from .selection import Exclusion
from .torch_backend import TorchBackend

DEFAULT_WORKSPACE_BYTES = 256 * 2**20
BACKENDS = ("auto", "torch", "triton", "numba")


class SearchResult(NamedTuple):
    """Top-k per query, best first: ``scores`` (B, k) float32, ``ids`` (B, k) int64.
    Missing results are id -1 with score -inf."""

    scores: Any
    ids: Any


class Backend(Protocol):
    name: str

    def plan(self, index: CodeIndex, bags: Bags, k: int) -> Plan: ...

    def search(
        self, index: CodeIndex, bags: Bags, k: int, exclude: Exclusion, regime: str
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Engine:
    """Search an index with bags of query codes ((B, T), or ragged with offsets and
    weights) or, with an encoder, raw query features.

    ``encoder`` maps a float (B, F) tensor on the index's device to (B, T) integer codes.
    ``workspace_bytes`` bounds the scratch memory of one step; bigger batches are split.
    ``dense_bytes`` bounds the dense score rows a backend may build for queries that touch
    most items (None: a quarter of the device's available memory; 0: never).
    """

    def __init__(
        self,
        index: CodeIndex,
        encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        backend: str = "auto",
        workspace_bytes: int | None = None,
        dense_bytes: int | None = None,
    ) -> None:
        if not isinstance(index, CodeIndex):
            raise TypeError(f"index: expected a CodeIndex, got {type(index).__name__}")
        if encoder is not None and not callable(encoder):
            raise TypeError(f"encoder: expected a callable, got {type(encoder).__name__}")
        if workspace_bytes is not None and (not isinstance(workspace_bytes, int) or workspace_bytes < 1):
            raise ValueError(f"workspace_bytes: expected a positive int, got {workspace_bytes!r}")
        if dense_bytes is not None and (not isinstance(dense_bytes, int) or isinstance(dense_bytes, bool) or dense_bytes < 0):
            raise ValueError(f"dense_bytes: expected an int >= 0 or None, got {dense_bytes!r}")
        self.index = index
        self.encoder = encoder
        self.workspace_bytes = workspace_bytes or DEFAULT_WORKSPACE_BYTES
        self.backend: Backend = _make_backend(backend, index.device, dense_bytes, self.workspace_bytes)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        backend: str = "auto",
        workspace_bytes: int | None = None,
        dense_bytes: int | None = None,
    ) -> Engine:
        """Load an index directory onto ``device`` (CUDA when available, else CPU), with
        the query encoder saved beside it, if any, so that ``search`` takes raw features."""
        from .storage import load_encoder

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        index = CodeIndex.load(path, device=device)
        return cls(index, load_encoder(Path(path), device=index.device), backend=backend, workspace_bytes=workspace_bytes,
                   dense_bytes=dense_bytes)

    def search(self, batch: Any, k: int = 100, exclude: Any = None, *, offsets: Any = None,
               weights: Any = None) -> SearchResult:
        """Top-k items per query. ``batch``: (B, T) integer codes; or flat codes with
        ``offsets`` (B + 1, from 0 to the number of codes; bags may be empty); or a
        ``torch.nested`` jagged tensor of codes; or, with an encoder, (B, F) float features.
        ``weights``: one float per code (the codes' shape), 1 when None. torch, numpy or
        cupy, and the result comes back as the same kind. ``exclude``: CSR
        ``(offsets, items)`` or a list of B per-query arrays of (external) item ids."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k!r}")
        k = int(k)
        bags, kind = self._bags(batch, offsets, weights)
        n_queries = bags.n_queries
        device = self.index.device
        excl = normalize_exclude(exclude, n_queries, self.index.n_items, device, self.index.item_ids)
        scores = torch.empty((n_queries, k), dtype=torch.float32, device=device)
        ids = torch.empty((n_queries, k), dtype=torch.int64, device=device)
        plan = self.backend.plan(self.index, bags, k)
        for start, stop in chunks(plan, self.workspace_bytes):
            sub = None if excl is None else _slice_csr(excl, start, stop)
            scores[start:stop], ids[start:stop] = self.backend.search(self.index, bags.slice(start, stop), k, sub,
                                                                      plan.regime)
        if self.index.item_ids is not None:
            ids = torch.where(ids >= 0, self.index.item_ids[ids.clamp(min=0)], ids)
        return SearchResult(from_torch(scores, kind), from_torch(ids, kind))

    def encode(self, features: Any) -> torch.Tensor:
        """Query features -> (B, T) int64 codes through the engine's encoder."""
        t, _ = to_torch(features, "batch")
        return self._encode(t)

    def _bags(self, batch: Any, offsets: Any, weights: Any) -> tuple[Bags, Kind]:
        index = self.index
        if offsets is None and not (isinstance(batch, torch.Tensor) and batch.is_nested):
            t, kind = to_torch(batch, "batch")
            if t.dtype.is_floating_point:
                if kind == "numpy":
                    t = t.to(index.device)
                elif t.device != index.device:
                    raise ValueError(f"batch: is on {t.device} but the index is on {index.device}; move one of them")
                if t.dim() != 2:
                    raise ValueError(f"batch: expected (B, F) features, got shape {tuple(t.shape)}")
                return to_bags(self._encode(t), None, weights, index.n_codes, index.device)[0], kind
            if t.dim() == 2 and index.n_tokens is not None and t.shape[1] != index.n_tokens:
                raise ValueError(f"batch: expected T = {index.n_tokens} codes per query, got {t.shape[1]}")
        return to_bags(batch, offsets, weights, index.n_codes, index.device)

    def _encode(self, features: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise TypeError(f"batch: got {features.dtype} features but this engine has no encoder; pass integer codes (B, T)")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("batch: features contain NaN or infinite values")
        return self.encoder(features.to(self.index.device))


def _slice_csr(csr: tuple[torch.Tensor, torch.Tensor], start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets, items = csr
    part = offsets[start : stop + 1]
    return part - part[0], items[int(part[0]) : int(part[-1])]


def _make_backend(name: str, device: torch.device, dense_bytes: int | None = None,
                  workspace_bytes: int | None = None) -> Backend:
    """``auto``: Triton on CUDA; on CPU the numba backend when numba is installed (the
    fastest CPU path), else the torch backend."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "auto" and device.type != "cuda":
        name = "numba" if importlib.util.find_spec("numba") is not None else "torch"
    if name == "numba":
        if device.type != "cpu":
            raise ValueError(f"backend: 'numba' runs on CPU indexes only, this index is on {device}")
        from .numba_backend import NumbaBackend

        return NumbaBackend(dense_bytes=dense_bytes)
    if name == "torch":
        return TorchBackend()
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend: 'triton' needs a CUDA index (or TRITON_INTERPRET=1 for the CPU interpreter)")
    from .triton_backend import TritonBackend

    return TritonBackend(dense_bytes=dense_bytes, workspace_bytes=workspace_bytes)
