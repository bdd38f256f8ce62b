"""Checkpoints: a directory with ``config.json`` (model kind and sizes, data source, training
settings) and ``model.safetensors`` (the state dict). No pickle: loading runs no code."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparcode.engine.replace import replace_dir

from . import data as datasets
from .interactions import Columns, Split, load_interactions
from .train import TrainConfig, make_model

LOADERS = {"ml-100k": datasets.load_ml100k, "ml-1m": datasets.load_ml1m, "bars": datasets.load_bars}


def load_data(name: str, path: Path | None, seed: int, size: tuple[int, int] = (2000, 800),
              columns: Columns | None = None, split: Split | None = None) -> datasets.InteractionData:
    """A dataset by name: ``synthetic`` (users, items = ``size``), ``interactions`` (the
    file ``path`` read by ``columns``, split by ``split``) or a loader with ``path``."""
    if name == "synthetic":
        return datasets.synthetic(*size, seed=seed)
    if name != "interactions" and name not in LOADERS:
        raise ValueError(f"--data: expected synthetic, interactions, {', '.join(LOADERS)}; got {name!r}")
    if path is None:
        raise ValueError(f"--path: the {name} loader needs the dataset {'file' if name == 'interactions' else 'directory'}")
    if name == "interactions":
        return load_interactions(Path(path), columns=columns or Columns(), split=split or Split(), seed=seed)
    return LOADERS[name](Path(path), seed=seed)


def save_checkpoint(out: Path, model: torch.nn.Module, config: dict) -> None:
    """Write atomically: a temporary directory renamed into place."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # copies: tied tables share memory
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    replace_dir(tmp, out)  # at every instant ``out`` is the whole old checkpoint or the whole new one


def load_checkpoint(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, datasets.InteractionData, dict]:
    """(model in eval mode, its dataset, its config)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path / 'config.json'}: cannot read a checkpoint config ({exc})") from None
    source = config["data"]
    data = load_data(source["name"], source["path"], source["seed"], tuple(source["size"]),
                     Columns(**source.get("columns", {})), Split(**source.get("split", {})))
    model = make_model(config["model"]["kind"], data, **config["model"]["kwargs"])
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path / 'model.safetensors'}: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # weights of another shape or version of the model
        raise ValueError(f"{path / 'model.safetensors'}: does not fit the {config['model']['kind']} model its config "
                         f"describes ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), data, config


def checkpoint_config(kind: str, kwargs: dict, data_name: str, data_path: Path | None, seed: int,
                      size: tuple[int, int], cfg: TrainConfig, info: dict, columns: Columns | None = None,
                      split: Split | None = None) -> dict:
    path = str(Path(data_path).resolve()) if data_path else None  # absolute: the checkpoint loads from any directory
    return {"model": {"kind": kind, "kwargs": kwargs},
            "data": {"name": data_name, "path": path, "seed": seed, "size": list(size), "columns": asdict(columns or Columns()),
                     "split": asdict(split or Split())},
            "train": asdict(cfg), "result": info}
