"""Checks shared by ``CodeIndex.from_postings`` and ``CodeIndex.load``.

Every failure is a ``ValueError`` whose message starts with the place (an argument name,
or ``file: field``) so that a user knows what to fix. Nothing is sorted or repaired.
"""

from __future__ import annotations

import torch

SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHECK_BLOCK = 1 << 24  # postings per block when a CSR is checked: bounds the check's temporaries


def fail(where: str, message: str) -> None:
    raise ValueError(f"{where}: {message}")


def check_tensor(t: object, where: str, *, ndim: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        fail(where, f"expected {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        fail(where, f"expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    return t


def check_postings(
    indptr: torch.Tensor,
    items: torch.Tensor,
    scores: torch.Tensor,
    n_items: int,
    where: dict[str, str],
) -> None:
    """Validate a CSR of posting lists; ``where`` names each field for messages."""
    check_tensor(indptr, where["indptr"], ndim=1, dtypes=(torch.int64,))
    check_tensor(items, where["items"], ndim=1, dtypes=(torch.int32,))
    check_tensor(scores, where["scores"], ndim=1, dtypes=SCORE_DTYPES)
    if not isinstance(n_items, int) or isinstance(n_items, bool) or n_items < 1:
        fail(where["n_items"], f"expected a positive int, got {n_items!r}")
    if n_items >= 2**31:
        fail(where["n_items"], f"at most 2**31 - 1 items per index, got {n_items}")
    if indptr.numel() < 2:
        fail(where["indptr"], "needs at least 2 entries (one code)")
    nnz = items.numel()
    if scores.numel() != nnz:
        fail(where["scores"], f"has {scores.numel()} entries but items has {nnz}")
    if int(indptr[0]) != 0:
        fail(where["indptr"], f"must start at 0, starts at {int(indptr[0])}")
    if int(indptr[-1]) != nnz:
        fail(where["indptr"], f"must end at nnz = {nnz}, ends at {int(indptr[-1])}")
    lengths = indptr[1:] - indptr[:-1]
    if bool((lengths < 0).any()):
        code = int(torch.nonzero(lengths < 0)[0])
        fail(where["indptr"], f"must be non-decreasing; decreases at code {code}")
    if nnz == 0:
        return
    lo, hi = int(items.min()), int(items.max())
    if lo < 0 or hi >= n_items:
        bad = lo if lo < 0 else hi
        pos = int(torch.nonzero(items == bad)[0])
        code = _code_of(indptr, pos)
        fail(where["items"], f"item {bad} of code {code} is outside [0, {n_items})")
    starts = torch.zeros(nnz, dtype=torch.bool, device=items.device)  # where a posting list begins
    starts[indptr[:-1][lengths > 0]] = True
    for lo in range(0, nnz, CHECK_BLOCK):  # in blocks: whole-array temporaries were 3 x 8 bytes per posting
        hi = min(nnz, lo + CHECK_BLOCK)
        finite = torch.isfinite(scores[lo:hi])
        if not bool(finite.all()):
            pos = lo + int(torch.nonzero(~finite)[0])
            fail(where["scores"], f"non-finite score {float(scores[pos])} in the posting list of code {_code_of(indptr, pos)}")
        first = max(lo, 1)
        step = items[first:hi] - items[first - 1 : hi - 1]  # int32 cannot overflow: items are in [0, n_items) < 2**31
        bad = (step <= 0) & ~starts[first:hi]
        if bool(bad.any()):
            pos = first + int(torch.nonzero(bad)[0])
            code = _code_of(indptr, pos)
            kind = "a duplicate item" if int(step[pos - first]) == 0 else "items out of order"
            fail(
                where["items"],
                f"posting list of code {code} must be strictly increasing: {kind} "
                f"({int(items[pos - 1])} then {int(items[pos])})",
            )


def check_item_ids(item_ids: torch.Tensor, n_items: int, where: str) -> None:
    check_tensor(item_ids, where, ndim=1, dtypes=(torch.int64,))
    if item_ids.numel() != n_items:
        fail(where, f"expected {n_items} external ids (one per item), got {item_ids.numel()}")
    if n_items > 1 and bool((item_ids.sort().values.diff() == 0).any()):
        fail(where, "external item ids must be unique")


def check_codebooks(codebooks: torch.Tensor, n_codes: int, where: str) -> None:
    """(P, C, d) shared by all tokens (V = C**P) or (T, P, C, d) one per token position
    (V = T * C**P)."""
    per_token = isinstance(codebooks, torch.Tensor) and codebooks.dim() == 4
    check_tensor(codebooks, where, ndim=4 if per_token else 3, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    groups = codebooks.shape[0] if per_token else 1
    n_sub, n_words, _ = codebooks.shape[-3:]
    if groups * n_words**n_sub != n_codes:
        formula = f"T x C**P = {groups} x {n_words**n_sub}" if per_token else "C**P"
        fail(where, f"shape {tuple(codebooks.shape)} gives {formula} = {groups * n_words**n_sub} codes, "
                    f"the index has {n_codes}")
    if not bool(torch.isfinite(codebooks).all()):
        fail(where, "contains non-finite values")


def _code_of(indptr: torch.Tensor, pos: int) -> int:
    """The code whose posting list holds flat position ``pos``."""
    return int(torch.searchsorted(indptr, torch.tensor([pos], device=indptr.device), right=True)[0]) - 1
