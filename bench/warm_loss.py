"""Where a warm-started SparCode stands against its two-tower before any training.

For each code space asked (T tokens x C codewords per stage), validation Recall@20 of
the two-tower, of the warm model unquantized (the two-tower's ranking, by construction),
quantized with every item scored, and through each code's top F x N items (the per-code
export rule, ``--cap-density``, which keeps the training activation's scores):

    python -m sparcode.bench.warm_loss --checkpoint TWO_TOWER_CHECKPOINT --space 4x64 4x128 --out bench/results

writes ``warm-loss-<dataset>.json`` (``-feedback.json`` with ``--error-feedback``).

Only the codes that the evaluated users hold are scored: a code's kept items depend on
its own scores alone, so the index restricted to those codes ranks them exactly as the
whole index would, without exporting all V x N pairs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparcode.engine.atomic import atomic_write_text
from sparcode.training import defaults
from sparcode.training.checkpoint import load_checkpoint
from sparcode.training.export import ExportRule
from sparcode.training.metrics import ranking_metrics
from sparcode.training.models import TwoTower
from sparcode.training.train import TrainConfig, full_scores, make_model, rank_excluding, tensors
from sparcode.training.warm import model_kwargs, warm_start

from .harness import device_label, slug

CHUNK = 256  # codes scored per scorer call


def space(text: str) -> tuple[int, int]:
    """"TxC" -> (T, C)."""
    try:
        tokens, words = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKENSxCODEWORDS such as 4x64, got {text!r}") from None
    if tokens < 1 or words < 1:
        raise argparse.ArgumentTypeError(f"expected positive TOKENSxCODEWORDS, got {text!r}")
    return tokens, words


def recall(scores: torch.Tensor, data, users: np.ndarray) -> float:
    ranked = rank_excluding(scores, users, [data.train], 20)
    return ranking_metrics(ranked, data.valid, users, ks=(20,))["recall@20"]


@torch.no_grad()
def unquantized_recall(two_tower: TwoTower, data, t: dict, users: np.ndarray, tokens: int) -> float:
    """Validation Recall@20 of the AllToAll warm-started from ``two_tower`` with ``tokens``
    tokens: the SparCode before quantization, whatever its codewords."""
    model = make_model("all_to_all", data, n_tokens=tokens, **model_kwargs(two_tower))
    warm_start(model, two_tower, t["history"], t["user_features"])
    return recall(full_scores(model.eval(), data, TrainConfig(), users, t), data, users)


@torch.no_grad()
def measure(two_tower: TwoTower, data, t: dict, users: np.ndarray, tokens: int, words: int, rule: ExportRule,
            unquantized: float | None = None, feedback: bool = defaults.FEEDBACK) -> dict:
    """Validation Recall@20 of the SparCode warm-started from ``two_tower`` with ``tokens``
    x ``words`` (per-token codebooks, with error ``feedback`` or without): unquantized
    (``unquantized`` if already measured for this T), quantized over every item, and
    through ``rule``'s lists."""
    started = time.perf_counter()
    if unquantized is None:
        unquantized = unquantized_recall(two_tower, data, t, users, tokens)
    torch.manual_seed(0)
    model = make_model("sparcode", data, n_tokens=tokens, n_words=words, feedback=feedback, **model_kwargs(two_tower))
    warm_start(model, two_tower, t["history"], t["user_features"])
    model.eval()
    u = torch.from_numpy(users)
    quantizer = model.encoder.quantizer
    codes = quantizer.codes(model.encoder.tokenizer(t["history"][u], None if t["user_features"] is None
                                                    else t["user_features"][u]))  # (B, T)
    distinct, inverse = torch.unique(codes.reshape(-1), return_inverse=True)
    vectors = model.items(torch.arange(data.n_items), t["item_features"])
    code_vectors = quantizer.code_vectors()[distinct]
    served, kept = [], []
    for lo in range(0, len(distinct), CHUNK):
        raw = model.raw(code_vectors[lo : lo + CHUNK].unsqueeze(1), vectors).squeeze(1) + model.bias  # (codes, N)
        served.append(torch.relu(raw))  # the model's own scores
        kept.append(torch.topk(F.softplus(raw), min(rule.cap, data.n_items), dim=1))  # what export keeps
    rows = torch.cat(served)
    lists = torch.zeros_like(rows).scatter_(1, torch.cat([k.indices for k in kept]), torch.cat([k.values for k in kept]))
    per_user = inverse.view(len(users), tokens)
    indexed = lists[per_user].sum(1)
    return {"tokens": tokens, "codewords": words, "codes": quantizer.n_codes, "feedback": feedback,
            "unquantized": unquantized,
            "quantized": recall(rows[per_user].sum(1), data, users), "index": recall(indexed, data, users),
            "candidates_per_user": float((indexed > 0).sum(1).float().mean()), "distinct_codes": len(distinct),
            "seconds": time.perf_counter() - started}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="a warm-started SparCode against its two-tower, before training")
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained two_tower checkpoint")
    p.add_argument("--space", type=space, nargs="+", default=[(defaults.TOKENS, defaults.CPU_CODEWORDS)],
                   metavar="TxC", help="code spaces: T tokens x C codewords per stage (V = T x C**2)")
    p.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=defaults.FEEDBACK,
                   help="each token position also quantizes the error the positions before it left")
    p.add_argument("--cap-density", type=float, default=defaults.INDEX_DENSITY,
                   help="each code keeps its top FRACTION x N items")
    p.add_argument("--out", type=Path, required=True, help="directory of warm-loss-<dataset>[-feedback].json")
    args = p.parse_args(argv)
    if not 0 < args.cap_density <= 1:
        p.error(f"--cap-density: expected a fraction in (0, 1], got {args.cap_density:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    two_tower, data, config = load_checkpoint(args.checkpoint)
    if not isinstance(two_tower, TwoTower):
        print(f"warm_loss: --checkpoint: {args.checkpoint} holds a {type(two_tower).__name__}, not a two_tower",
              file=sys.stderr)
        return 2
    two_tower.eval()
    t = tensors(data, TrainConfig())
    users = np.nonzero(data.valid.lengths)[0]
    report = {"dataset": data.name, "command": "python -m sparcode.bench.warm_loss " + shlex.join(argv),
              "date": date.today().isoformat(), "device": device_label("cpu"), "torch": torch.__version__,
              "users": len(users), "cap_density": args.cap_density, "error_feedback": args.error_feedback,
              "checkpoint": {"train": config.get("train"), "epochs": config.get("result", {}).get("epochs")},
              "two_tower": recall(full_scores(two_tower, data, TrainConfig(), users, t), data, users), "spaces": []}
    rule = ExportRule.top(args.cap_density, data.n_items)
    print(f"warm_loss: {data.name}, {len(users)} validation users; two-tower Recall@20 {report['two_tower']:.4f}")
    by_tokens: dict[int, float] = {}  # the unquantized model depends on T only
    for tokens, words in args.space:
        report["spaces"].append(measure(two_tower, data, t, users, tokens, words, rule, by_tokens.get(tokens),
                                        args.error_feedback))
        by_tokens[tokens] = report["spaces"][-1]["unquantized"]
        row = report["spaces"][-1]
        print(f"  {tokens} x {words} ({row['codes']:,} codes): unquantized {row['unquantized']:.4f}, quantized "
              f"{row['quantized']:.4f}, index {row['index']:.4f} ({row['candidates_per_user']:.0f} candidates per user)",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    file = args.out / f"warm-loss-{slug(data.name)}{'-feedback' if args.error_feedback else ''}.json"
    atomic_write_text(file, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
