"""Every Triton kernel, as the backend launches it in each regime (weighted or not, with
exclusions or not, each score dtype), lowers to Triton IR for a Hopper target: the
compiler's type rules hold without a GPU (tests/lowering.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import quantized_index

from sparcode.engine import Engine
from sparcode.engine.synthetic import random_codes
from sparcode.engine.triton_backend import TritonBackend

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="on a GPU every launch compiles for real")
LOWERING = Path(__file__).with_name("lowering.py")


def recorded_launches(monkeypatch) -> list[dict]:
    """The specs of the kernel launches of small searches in every regime."""
    from lowering import describe
    from triton.runtime.interpreter import InterpretedFunction

    specs = {}
    run = InterpretedFunction.run

    def recording(self, *args, **kwargs):
        spec = describe(self, args, kwargs)
        specs[json.dumps(spec, sort_keys=True)] = spec
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    for case, dtype in enumerate((torch.float16, torch.bfloat16, torch.float32)):
        index = quantized_index(12, 150, 20, seed=case, dtype=dtype, negative=case == 2)
        codes = random_codes(3, 3, 12, seed=case)
        offsets = torch.arange(0, 10, 3)
        weights = torch.tensor([1.0, 0.5, 2.0, 1.0, -1.0, 1.0, 0.25, 1.0, 3.0])
        for regime in ("table", "candidate", "tiled", "dense", "dense-packed"):
            engine = Engine(index, backend="triton")
            engine.backend = TritonBackend(regime=regime, tile_items=64, dense_bytes=2**30)
            engine.search(codes, k=5)
            engine.search(codes.reshape(-1), k=5, offsets=offsets, weights=weights,
                          exclude=[np.array([1, 2]), np.array([], dtype=np.int64), np.array([7])])
    return list(specs.values())


def test_every_launch_lowers_for_hopper(monkeypatch, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    specs = recorded_launches(monkeypatch)
    kernels = {spec["kernel"] for spec in specs}
    assert {"_table_kernel", "_candidate_keys_kernel", "_tiled_keys_kernel", "_dense_keys_kernel", "_k2_kernel"} <= kernels
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(LOWERING), str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
