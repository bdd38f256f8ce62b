"""Warm start: a SparCode or AllToAll that begins where a trained TwoTower is.

The two share the tokenizer's design and the item tower, so the weights carry over.
Every token head starts as the two-tower's user vector (the mean of its heads, which is
what it scores with; so the model's T need not be the two-tower's), the item vectors as
its unit item vectors, scaled so that the sum over tokens of the scorer's dot product is
the two-tower's logit for a typical user, and the scorer's MLP already starts at zero
output (``Scorer``). Unquantized (AllToAll), a user's scores are then the two-tower's
times a positive factor of that user, cut at 0 by the activation: the same top items
wherever any cosine is positive. The model must be built without token normalisation
(``normalize_tokens=False``): standardising each token dimension over a batch would
shift every item's score by its own offset. SparCode's codebooks start from k-means over
the tokens of every user, one seed per token position; with error feedback
(``--error-feedback``) position t quantizes the user vector plus the error positions
0..t-1 left, so the errors cancel in the sum over tokens (on Gowalla the quantization,
not the 1% index, is what the start loses: docs/accuracy.md). Items with features keep
their embedding tables but not the two-tower's item MLP, which the SparCode item tower
does not have (its scorer crosses features instead): there the start is only near the
two-tower's, and the first validation Recall is measured (``fit(measure_start=True)``)
rather than assumed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import SparCode, TwoTower

TOKENIZER_SHAPE = ("n_items", "user_cardinalities", "dim", "hidden")


def model_kwargs(source: TwoTower) -> dict:
    """What a model that starts from ``source`` must be built with: its embedding size and
    tokenizer's shape, no token normalisation."""
    return {"dim": source.tokenizer.dim, "tokenizer_hidden": list(source.tokenizer.hidden), "normalize_tokens": False}


def check_compatible(model: SparCode, source: TwoTower) -> None:
    """A clear error when ``source``'s weights do not fit ``model``."""
    if not isinstance(source, TwoTower):
        raise ValueError(f"--init-from: expected a two_tower checkpoint, got a {type(source).__name__} one")
    dst, src = model.encoder.tokenizer, source.tokenizer
    for name in TOKENIZER_SHAPE:
        if getattr(dst, name) != getattr(src, name):
            raise ValueError(f"--init-from: the two-tower's tokenizer {name} is {getattr(src, name)}, this model's "
                             f"{getattr(dst, name)} (train both on the same data; without --dim the model takes the two-tower's)")
    if dst.normalize:
        raise ValueError("--init-from: the model normalises its tokens; build it with normalize_tokens=False")


def user_tokens(tokenizer: nn.Module, history: torch.Tensor, user_features: torch.Tensor | None,
                chunk: int = 4096) -> torch.Tensor:
    """(U, T, d) tokens of every user, ``chunk`` users at a time."""
    return torch.cat([tokenizer(history[lo : lo + chunk], None if user_features is None else user_features[lo : lo + chunk])
                      for lo in range(0, len(history), chunk)])


@torch.no_grad()
def warm_start(model: SparCode, source: TwoTower, history: torch.Tensor, user_features: torch.Tensor | None) -> None:
    """Start ``model`` where ``source`` is, from every user's ``history`` (U, H) and
    ``user_features`` (U, F) (see the module's docstring)."""
    check_compatible(model, source)
    model.to(next(source.parameters()).device)  # the tokens and the k-means start are computed where the source is
    dst = model.encoder.tokenizer
    src_heads, dim, n_tokens = source.tokenizer.heads, dst.dim, dst.n_tokens
    kept = {k: v for k, v in source.tokenizer.state_dict().items() if not k.startswith("heads.")}  # T may differ
    dst.load_state_dict({**dst.state_dict(), **kept})
    dst.heads.weight.copy_(src_heads.weight.view(source.tokenizer.n_tokens, dim, -1).mean(0).repeat(n_tokens, 1))
    dst.heads.bias.copy_(src_heads.bias.view(source.tokenizer.n_tokens, dim).mean(0).repeat(n_tokens))
    model.items.load_state_dict(source.items.state_dict())
    training = dst.training
    dst.eval()
    tokens = user_tokens(dst, history, user_features)
    dst.train(training)
    if isinstance(source.item_mlp, nn.Identity):  # id-only items: the two-tower's unit item vectors
        typical = float(tokens[:, 0].norm(dim=-1).median().clamp(min=1e-6))
        scale = 1.0 / (source.temperature * n_tokens * model.scorer.dot_scale * typical)
        model.items.ids.weight.copy_(F.normalize(model.items.ids.weight, dim=-1) * scale)
    if model.quantize:
        model.codebook_trainer.initialize(tokens, seeds=range(n_tokens))
