"""Conversion between the array kinds a caller may pass (torch, numpy, cupy) and torch.

cupy arrays cross through DLPack (zero copy, same GPU) and cupy is imported only when a
cupy array is seen, so the engine never needs it installed.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

Kind = Literal["torch", "numpy", "cupy"]


def kind_of(x: Any) -> Kind | None:
    if isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    if type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "__dlpack__"):
        return "cupy"
    return None


def to_torch(x: Any, name: str) -> tuple[torch.Tensor, Kind]:
    """A torch view of ``x`` and the kind to return results in."""
    kind = kind_of(x)
    if kind == "torch":
        return x, kind
    if kind == "numpy":
        if x.dtype == object:
            raise TypeError(f"{name}: object arrays are not supported; pass a numeric array")
        x = np.ascontiguousarray(x)
        return torch.from_numpy(x if x.flags.writeable else x.copy()), kind
    if kind == "cupy":
        return torch.from_dlpack(x), kind
    raise TypeError(f"{name}: expected a torch tensor, numpy array or cupy array, got {type(x).__name__}")


def from_torch(t: torch.Tensor, kind: Kind) -> Any:
    """Return ``t`` as the caller's kind of array."""
    if kind == "torch":
        return t
    if kind == "numpy":
        return t.cpu().numpy()
    import cupy

    return cupy.from_dlpack(t.contiguous())
