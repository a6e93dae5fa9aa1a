"""Saved models: ``config.json`` (what defines the predictor) + ``model.safetensors`` (tensors).

No pickle. The config holds the model's hyper-parameters, never where it ran: compute and
cluster settings (``Options``) come from the caller at load time.

A model file is not trusted. ``read_model`` refuses, with a ``ModelFileError`` (a
``ValueError``) naming the file and the problem: unreadable JSON or safetensors, another format
version or model type, and whatever the model's own check (``ModelFile`` helpers, called by the
estimators' ``load``) finds wrong: missing or unknown keys (a saved model has no compute or
cluster options), tensors missing, unexpected, non-finite or of shapes other than the config's,
metrics that are not symmetric positive semi-definite, a kernel scale that is not positive.
Last, the SHA-256 digest written at save over the whole config and every tensor (name, dtype,
shape, bytes) must match: an edited file is refused. The digest detects edits and damage; it
is no signature: whoever can write the file can also recompute it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import numbers
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from ray_convrfm.atomic import make_dirs, readable_name, transaction, write_file, write_text
from ray_convrfm.checks import check_psd

#: Bumped whenever the saved layout changes; ``load`` refuses other versions. Version 2: the
#: estimators' hyper-parameters without ``Options`` (how and where to compute is not saved).
#: Version 3: a SHA-256 ``digest`` of the config and the tensors, verified at load.
#: Version 4: ``agop_classes``. Version 5: ``DeepConvRFM.filter_power``; ``X_fit`` may be uint8.
#: Version 6: ``ConvRFM.metric_floor``. Version 7: ``DeepConvRFM.pool``, ``pool_mode``,
#: ``layer_patience`` and ``layer_val_acc`` (the stack kept may be shorter than ``layers``).
#: Version 8: ``DeepConvRFM.normalise``; ``ConvRFM.patch_basis`` may be a share of energy.
#: Version 9: ``DeepConvRFM.activation`` and ``feature_basis``.
FORMAT_VERSION = 9
CONFIG = "config.json"
TENSORS = "model.safetensors"
DIGEST = "digest"
_DIGEST_PREFIX = "sha256:"

T = TypeVar("T")


class ModelFileError(ValueError):
    """A saved model that cannot be read or is not what ``save`` wrote (names the file)."""


def write_model(path: str | Path, model_name: str, config: dict,
                tensors: dict[str, torch.Tensor]) -> Path:
    """Write the tensors and then the config with its digest (a directory without a config is
    no model), atomically: both go to temporary names in ``path`` and are renamed into place
    once both are written (at the end of the caller's ``atomic.transaction()``, if any), so a
    failed write leaves the previous model, or nothing, and is an ``OSError`` naming the file."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    config = jsonable({"format_version": FORMAT_VERSION, "model": model_name, **config})
    config[DIGEST] = model_digest(config, tensors)
    with transaction():
        make_dirs(path)
        write_file(path / TENSORS, lambda tmp: save_file(tensors, str(tmp)))
        write_text(path / CONFIG, json.dumps(config, indent=2))
    return path


def read_model(path: str | Path, expected_model: str,
               build: Callable[[dict, dict[str, torch.Tensor], ModelFile], T]) -> T:
    """``build(config, tensors, file)`` of a model saved by ``write_model``, checked.

    Refuses (``ModelFileError``) other versions and model types, unreadable files, whatever
    ``build`` refuses (it raises ``ModelFileError`` through ``file``, or a ``ValueError`` or
    ``TypeError`` that is reported as a problem of the config) and, last, a digest that does
    not match the content. A directory without the two files is a ``FileNotFoundError``.
    """
    file = ModelFile(path)
    config, tensors = file.read(expected_model)
    try:
        model = build(config, tensors, file)
    except ModelFileError:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise file.bad_config(f"{type(err).__name__}: {err}") from err
    file.verify_digest(config, tensors)
    return model


class ModelFile:
    """A saved model's directory: reading it and the checks shared by the estimators' loads.

    Every check raises ``ModelFileError`` naming ``config.json`` or ``model.safetensors``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / CONFIG
        self.tensor_file = self.path / TENSORS

    def bad_config(self, problem: str) -> ModelFileError:
        return ModelFileError(f"{self.config_file}: {problem}")

    def bad_tensors(self, problem: str) -> ModelFileError:
        return ModelFileError(f"{self.tensor_file}: {problem}")

    # ------------------------------------------------------------------ reading
    def read(self, expected_model: str) -> tuple[dict, dict[str, torch.Tensor]]:
        """(config, tensors), parsed; refuses other format versions and model types."""
        from safetensors.torch import load_file

        if not self.config_file.is_file() or not self.tensor_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a saved model: expected {CONFIG} and "
                                    f"{TENSORS}")
        try:
            config = json.loads(self.config_file.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
            raise self.bad_config(f"not valid JSON ({err})") from err
        if not isinstance(config, dict):
            raise self.bad_config(f"expected a JSON object; found {type(config).__name__}")
        version = config.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelFileError(f"{self.path} was saved in model format version {version!r}; "
                                 f"this version of ray_convrfm reads format {FORMAT_VERSION} "
                                 f"only")
        if config.get("model") != expected_model:
            raise ModelFileError(f"{self.path} holds a {config.get('model')} model, not a "
                                 f"{expected_model}")
        try:
            tensors = load_file(str(self.tensor_file))
        except Exception as err:  # safetensors' own errors: truncated, foreign, random bytes
            raise self.bad_tensors(f"not a readable safetensors file "
                                   f"({type(err).__name__}: {err})") from err
        return config, tensors

    def verify_digest(self, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse content whose digest differs from the one recorded at save."""
        recorded = config.get(DIGEST)
        if not isinstance(recorded, str) or not recorded.startswith(_DIGEST_PREFIX):
            raise self.bad_config(f"no {DIGEST!r} of the form 'sha256:<hex>'; found "
                                  f"{recorded!r}")
        actual = model_digest({k: v for k, v in config.items() if k != DIGEST}, tensors)
        if not hmac.compare_digest(recorded.encode("utf-8", "replace"), actual.encode()):
            raise self.bad_config(
                f"the content of {CONFIG} and {TENSORS} does not match the digest recorded at "
                f"save ({recorded[:19]}..., content {actual[:19]}...): one of them was edited "
                f"or damaged after save")

    # ------------------------------------------------------------------ config checks
    def keys(self, obj, what: str, required: Iterable[str], optional: Iterable[str] = (),
             hint: str = "") -> dict:
        """``obj`` as a dict with every ``required`` key and no key outside ``optional``."""
        if not isinstance(obj, dict):
            raise self.bad_config(f"{what} must be a JSON object; found {type(obj).__name__}")
        required = set(required)
        missing = sorted(required - set(obj))
        if missing:
            raise self.bad_config(f"{what} lacks {missing}")
        unknown = sorted(set(obj) - required - set(optional))
        if unknown:
            raise self.bad_config(f"{what} has unknown keys {unknown}{hint}")
        return obj

    def integer(self, value, what: str, low: int | None = None,
                high: int | None = None) -> int:
        """An integer (not a bool) in [low, high]."""
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise self.bad_config(f"{what} must be an integer; found {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.bad_config(f"{what} must be in [{low}, {high}]; found {value}")
        return int(value)

    def number(self, value, what: str, low: float = -math.inf, strict: bool = False) -> float:
        """A finite number >= low (> low with ``strict``)."""
        if not isinstance(value, numbers.Real) or isinstance(value, bool) \
                or not math.isfinite(value):
            raise self.bad_config(f"{what} must be a finite number; found {value!r}")
        if value < low or (strict and value == low):
            raise self.bad_config(f"{what} must be {'>' if strict else '>='} {low}; found "
                                  f"{value}")
        return float(value)

    def shape(self, value, what: str, length: int) -> tuple[int, ...]:
        """A list of ``length`` positive integers."""
        if not isinstance(value, list) or len(value) != length:
            raise self.bad_config(f"{what} must be a list of {length} positive integers; "
                                  f"found {value!r}")
        return tuple(self.integer(v, what, 1) for v in value)

    def classes(self, config: dict) -> np.ndarray:
        """``classes`` (at least two, distinct, finite) as an array of ``classes_dtype``."""
        values, dtype = config["classes"], config["classes_dtype"]
        if not isinstance(values, list) or len(values) < 2:
            raise self.bad_config(f"classes must be a list of at least 2 labels; found "
                                  f"{values!r}")
        try:
            dtype = np.dtype(dtype)
            if dtype.kind not in "biufU":
                raise TypeError(f"kind {dtype.kind!r}")
            classes = np.asarray(values, dtype=dtype)
        except (TypeError, ValueError, OverflowError) as err:
            raise self.bad_config(f"classes {values[:10]!r} are not labels of classes_dtype "
                                  f"{config['classes_dtype']!r} ({err})") from err
        if classes.ndim != 1 or (classes.dtype.kind == "f" and not np.isfinite(classes).all()):
            raise self.bad_config(f"classes must be a flat list of finite labels; found "
                                  f"{values[:10]!r}")
        if len(np.unique(classes)) != len(classes):
            raise self.bad_config(f"classes has repeated labels: {values[:10]!r}")
        return classes

    def history(self, value, what: str, most: int) -> list[dict]:
        """A list of 1 to ``most`` records (dicts), one per iteration."""
        if not isinstance(value, list) or not 1 <= len(value) <= most \
                or not all(isinstance(h, dict) for h in value):
            raise self.bad_config(f"{what} must be a list of 1 to {most} records (one per "
                                  f"iteration); found {str(value)[:80]}")
        return value

    # ------------------------------------------------------------------ tensor checks
    def tensor_names(self, tensors: dict, required: Iterable[str],
                     optional: Iterable[str] = ()) -> None:
        """Exactly the expected tensors: a foreign safetensors file is refused here."""
        required = set(required)
        missing = sorted(required - set(tensors))
        unknown = sorted(set(tensors) - required - set(optional))
        if missing or unknown:
            problem = []
            if missing:
                problem.append(f"lacks tensors {missing[:10]}")
            if unknown:
                problem.append(f"has unexpected tensors {unknown[:10]}")
            raise self.bad_tensors(" and ".join(problem) + " (is it this model's file?)")

    def tensor(self, tensors: dict, name: str, shape: tuple, psd: bool = False,
               pixels: bool = False) -> torch.Tensor:
        """Tensor ``name``: float32 or float64 (or, with ``pixels``, uint8: 8-bit images), of
        ``shape`` (None: any size), finite; with ``psd``, a non-zero symmetric positive
        semi-definite matrix."""
        t = tensors[name]
        allowed = (torch.float32, torch.float64) + ((torch.uint8,) if pixels else ())
        if t.dtype not in allowed:
            raise self.bad_tensors(f"tensor {name} must be float32 or float64"
                                   f"{' (or uint8 pixels)' if pixels else ''}; found {t.dtype}")
        if len(t.shape) != len(shape) or any(s is not None and a != s
                                             for a, s in zip(t.shape, shape, strict=True)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise self.bad_tensors(f"tensor {name} has shape {tuple(t.shape)}; the config "
                                   f"says {want}")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise self.bad_tensors(f"tensor {name} has {bad} NaN or inf entries")
        if psd:
            if not bool(t.any()):
                raise self.bad_tensors(f"tensor {name} is zero (a metric is never zero)")
            try:
                check_psd(t, name)
            except ValueError as err:
                raise self.bad_tensors(str(err)) from err
        return t


def model_digest(config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` over the canonical JSON of ``config`` and, in name order, every tensor's
    name, dtype, shape and bytes."""
    h = hashlib.sha256(b"ray_convrfm model\0")
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        header = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
        h.update(b"\0" + header.encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return _DIGEST_PREFIX + h.hexdigest()


def saved_digest(path: str | Path) -> str | None:
    """The digest recorded in the ``config.json`` of a model just written by ``write_model``
    (also while the enclosing ``atomic.transaction()`` still holds it under its temporary
    name)."""
    return json.loads(readable_name(Path(path) / CONFIG).read_text())[DIGEST]


def hyper_parameters(estimator) -> dict:
    """The estimator's own parameters without ``options`` (how to compute is not saved)."""
    return {k: v for k, v in estimator.get_params(deep=False).items() if k != "options"}


def saved_parameter_names(cls) -> list[str]:
    """The constructor parameters ``save`` writes for estimator class ``cls``."""
    return [k for k in cls._get_param_names() if k != "options"]


def jsonable(obj):
    """Plain JSON types from numpy scalars, tuples and nested containers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
