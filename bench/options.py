"""Command-line options of ``sparcode bench``, apart from the harness so that building the
``sparcode`` parser imports nothing heavy (and the serving commands never import training)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .regimes import REGIMES


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--regime", default="R1", choices=[*REGIMES, "R4", "all"],
                        help="R1-R3: quantized-token shapes; R4: item codes (ragged history bags, history excluded)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--scale", type=float, default=1.0, help="divide N and B further by this factor")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes and 5 repeats: under 2 minutes on 2 CPU cores")
    parser.add_argument("--scaling", action="store_true", help="also measure curves over N and over B")
    return parser
