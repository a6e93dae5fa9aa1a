"""Saved models: ``config.json`` (what defines the predictor) + ``model.safetensors`` (tensors).

No pickle. The config holds the model's hyper-parameters, never where it ran: compute and
cluster settings (``Options``) come from the caller at load time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

#: Bumped whenever the saved layout changes; ``load`` refuses other versions. Version 2: the
#: estimators' hyper-parameters without ``Options`` (how and where to compute is not saved).
FORMAT_VERSION = 2
CONFIG = "config.json"
TENSORS = "model.safetensors"


def write_model(path: str | Path, model_name: str, config: dict,
                tensors: dict[str, torch.Tensor]) -> Path:
    """Write the tensors and then the config (a directory without a config is no model)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / TENSORS))
    config = {"format_version": FORMAT_VERSION, "model": model_name, **config}
    (path / CONFIG).write_text(json.dumps(jsonable(config), indent=2))
    return path


def read_model(path: str | Path, expected_model: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a model saved by ``write_model``; refuses other versions/types."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.exists() or not (path / TENSORS).exists():
        raise FileNotFoundError(f"{path} is not a saved model: expected {CONFIG} and {TENSORS}")
    config = json.loads(cfg_file.read_text())
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} was saved in model format version {version}; this version of "
                         f"ray_convrfm reads format {FORMAT_VERSION} only")
    if config.get("model") != expected_model:
        raise ValueError(f"{path} holds a {config.get('model')} model, not a {expected_model}")
    return config, load_file(str(path / TENSORS))


def hyper_parameters(estimator) -> dict:
    """The estimator's own parameters without ``options`` (how to compute is not saved)."""
    return {k: v for k, v in estimator.get_params(deep=False).items() if k != "options"}


def jsonable(obj):
    """Plain JSON types from numpy scalars, tuples and nested containers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
