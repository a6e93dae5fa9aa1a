"""Deep ConvRFM (spec section 6): ConvRFM layers stacked through learned filter banks.

Layer l fits a ConvRFM of depth ``total_depth - l`` on its inputs and chooses M on validation;
the next layer's inputs are the bias-free q x q convolution of every image with ``width``
filters W = G M^(1/2) (G: seeded i.i.d. N(0, 1)); no non-linearity, the next kernel brings it.
A layer whose learned M did not beat M = I on validation keeps the random bank W = G. The final
predictor is the kernel regressor of the last layer.

Reference: Beaglehole et al., arXiv 2309.00570 (2023).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from ray_convrfm.backends.distributed import LocalKernels, RayKernels
from ray_convrfm.checks import as_images
from ray_convrfm.kernels.agop import psd_power
from ray_convrfm.kernels.devices import resolve_device, resolve_dtype
from ray_convrfm.kernels.kernel import KernelParams, as_tensor
from ray_convrfm.kernels.patches import featurise
from ray_convrfm.models.convrfm import (
    FORMAT_VERSION,
    ConvRFM,
    _jsonable,
    _read_config,
    _training_images,
    prepare_fit_inputs,
)

log = logging.getLogger(__name__)

_CONFIG = "config.json"
_TENSORS = "model.safetensors"
_FINAL = "final"


class DeepConvRFM(ClassifierMixin, BaseEstimator):
    """Deep Convolutional Recursive Feature Machine.

    Parameters
    ----------
    layers : number of ConvRFM layers
    width : filters per learned filter bank
    total_depth : kernel depth of the first layer; layer l uses total_depth - l, so the number
        of convolutions stays constant (default ``layers + 2``: the last layer has depth 3)
    patch_size, padding, iters, ridges, agop_samples, agop_power, val_fraction, patch_basis,
    workers, address, store, solver, centers, gpus_per_worker, placement_timeout_s, device,
    dtype, engine, memory_budget_mb, verbose : as in ``ConvRFM`` (every layer; layer l's
        kernels go to ``store/layer<l>``; with workers, each featurises its own shard)
    random_state : seeds the validation split, layer l's ConvRFM (``random_state + l``) and its
        filters (``numpy.random.default_rng([random_state, l])``)

    Attributes
    ----------
    layers_ : one dict per layer: ``depth``, ``M`` (d, d), ``filters`` (width, C, q, q) or None
        for the last layer, ``learned`` (whether M beat M = I), ``best_iter``, ``ridge``,
        ``history`` (the layer's ConvRFM history)
    final_ : the last layer's fitted ``ConvRFM``
    classes_ : the class labels
    """

    def __init__(self, layers: int = 3, width: int = 64, total_depth: int | None = None,
                 patch_size: int = 3, padding: bool = False, iters: int = 3,
                 ridges: tuple[float, ...] = (1e-8, 1e-5, 1e-3), agop_samples: int = 256,
                 agop_power: float = 1.0, val_fraction: float = 0.1, patch_basis: str = "auto",
                 workers: int = 0, address: str | None = None, store: str | None = None,
                 solver: str = "exact", centers: int | None = None,
                 gpus_per_worker: float | None = None, placement_timeout_s: float | None = 600,
                 device: str = "auto",
                 dtype: str = "float32", engine: str = "auto",
                 memory_budget_mb: int = 512, random_state: int = 0, verbose: bool = False):
        self.layers = layers
        self.width = width
        self.total_depth = total_depth
        self.patch_size = patch_size
        self.padding = padding
        self.iters = iters
        self.ridges = ridges
        self.agop_samples = agop_samples
        self.agop_power = agop_power
        self.val_fraction = val_fraction
        self.patch_basis = patch_basis
        self.workers = workers
        self.address = address
        self.store = store
        self.solver = solver
        self.centers = centers
        self.gpus_per_worker = gpus_per_worker
        self.placement_timeout_s = placement_timeout_s
        self.device = device
        self.dtype = dtype
        self.engine = engine
        self.memory_budget_mb = memory_budget_mb
        self.random_state = random_state
        self.verbose = verbose

    def _depths(self) -> list[int]:
        if not isinstance(self.layers, int) or self.layers < 1:
            raise ValueError(f"layers must be a positive integer; found {self.layers!r}")
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width must be a positive integer; found {self.width!r}")
        if not isinstance(self.random_state, int | np.integer):
            raise ValueError(f"random_state must be an integer; found {self.random_state!r}")
        total = self.layers + 2 if self.total_depth is None else self.total_depth
        depths = [total - layer for layer in range(self.layers)]
        if depths[-1] < 1:
            raise ValueError(f"total_depth {total} leaves layer {self.layers - 1} a kernel of "
                             f"depth {depths[-1]}; it must be at least layers ({self.layers})")
        return depths

    def _layer_model(self, depth: int, layer: int) -> ConvRFM:
        store = f"{str(self.store).rstrip('/')}/layer{layer}" if self.store else None
        return ConvRFM(depth=depth, patch_size=self.patch_size, padding=self.padding,
                       iters=self.iters, ridges=self.ridges, agop_samples=self.agop_samples,
                       agop_power=self.agop_power, val_fraction=self.val_fraction,
                       patch_basis=self.patch_basis, workers=self.workers,
                       address=self.address, device=self.device, dtype=self.dtype,
                       store=store, solver=self.solver, centers=self.centers,
                       gpus_per_worker=self.gpus_per_worker,
                       placement_timeout_s=self.placement_timeout_s,
                       engine=self.engine, memory_budget_mb=self.memory_budget_mb,
                       random_state=int(self.random_state) + layer, verbose=self.verbose)

    def _filters(self, M: torch.Tensor, channels: int, layer: int, learned: bool) -> torch.Tensor:
        q = self.patch_size
        d = channels * q * q
        G = np.random.default_rng([int(self.random_state), layer]).standard_normal((self.width, d))
        W = torch.from_numpy(G)
        if learned:
            W = W @ psd_power(M, 0.5)
        return W.reshape(self.width, channels, q, q).to(torch.float32)

    def fit(self, X, y=None, X_val=None, y_val=None, monitor=None) -> DeepConvRFM:
        """Fit every layer in turn; same arguments as ``ConvRFM.fit``. Returns self.

        With ``workers`` the training images are sharded once; after each layer every worker
        featurises its own shard, so images never return to this process.
        """
        depths = self._depths()
        rng = np.random.default_rng(self.random_state)
        data = prepare_fit_inputs(self, X, y, X_val, y_val, monitor, rng)
        KernelParams(depths[0], self.patch_size, self.padding).grids(*data.X.shape[2:])
        dev, dt = resolve_device(self.device), resolve_dtype(self.dtype)
        Z = _training_images(data.X_fit, self.workers, dt, dev)
        Zv = as_tensor(data.X_val, dt, dev)
        Zm = None if data.X_mon is None else as_tensor(data.X_mon, dt, dev)
        self.image_shape_ = tuple(int(s) for s in data.X.shape[1:])
        self.layers_ = []
        shards = None
        if self.workers:  # the training images go to the workers once, for every layer
            from ray_convrfm.backends.distributed import open_shards

            shards = open_shards(Z, self.workers, self.address, self.gpus_per_worker,
                                 self.verbose, placement_timeout_s=self.placement_timeout_s,
                                 align=bool(self.store))
            Z = None
        try:
            for layer, depth in enumerate(depths):
                rfm = self._layer_model(depth, layer)
                params = rfm._check_params()
                rfm.classes_ = self.classes_
                _, _, eng, budget = rfm._context()
                if shards is None:
                    kernels = LocalKernels(Z, params, eng, budget, self.verbose)
                else:
                    kernels = RayKernels(shards, params, eng, budget, dt, dev, rfm.store,
                                         owns_shards=False)
                rfm._fit_backend(kernels, data.y_fit, Zv, data.y_val, Zm, data.y_mon,
                                 np.random.default_rng(rfm.random_state), Zv.shape[1:])
                info = {"depth": depth, "M": rfm.M_, "filters": None,
                        "learned": rfm.best_iter_ > 0, "best_iter": rfm.best_iter_,
                        "ridge": rfm.ridge_, "history": rfm.history_,
                        "val_acc": rfm.history_[rfm.best_iter_]["val_acc"]}
                log.info("layer %d (kernel depth %d): val acc %.4f, iteration %d chosen%s",
                         layer, depth, info["val_acc"], rfm.best_iter_,
                         "" if info["learned"] else " (M = I: random filters)")
                if layer < len(depths) - 1:
                    filters = self._filters(rfm.M_, Zv.shape[1], layer, info["learned"])
                    info["filters"] = filters
                    if shards is None:
                        Z = featurise(Z, filters, self.padding)
                    else:  # each worker featurises its own shard
                        shards.featurise(filters.numpy(), self.padding)
                    Zv = featurise(Zv, filters, self.padding)
                    Zm = None if Zm is None else featurise(Zm, filters, self.padding)
                else:
                    self.final_ = rfm
                self.layers_.append(info)
        finally:
            if shards is not None:
                shards.close()
        return self

    def _chain(self) -> list:
        """The filter banks between the input and the last layer: [(filters, padding), ...]."""
        return [(info["filters"].numpy(), self.padding) for info in self.layers_[:-1]]

    def decision_function(self, X) -> np.ndarray:
        """Class scores of the last layer's kernel regressor, shape (m, n_classes); with
        ``workers`` the images are featurised and scored on the workers."""
        check_is_fitted(self, "final_")
        X = as_images(X, "X", channels=self.image_shape_[0], image_size=self.image_shape_[1:])
        return self.final_._scores(X, self._chain())

    def predict(self, X) -> np.ndarray:
        """Predicted class labels, shape (m,)."""
        return self.classes_[self.decision_function(X).argmax(1)]

    def save(self, path: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` (metrics, filters) + ``final/`` (no pickle)."""
        from safetensors.torch import save_file

        check_is_fitted(self, "final_")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.final_.save(path / _FINAL)
        tensors = {f"layer{i}.M": info["M"].contiguous() for i, info in enumerate(self.layers_)}
        tensors.update({f"layer{i}.filters": info["filters"].contiguous()
                        for i, info in enumerate(self.layers_) if info["filters"] is not None})
        save_file(tensors, str(path / _TENSORS))
        layers = [{k: v for k, v in info.items() if k not in ("M", "filters")}
                  for info in self.layers_]
        config = {"format_version": FORMAT_VERSION, "model": type(self).__name__,
                  "params": _jsonable(self.get_params()),
                  "classes": _jsonable(self.classes_.tolist()),
                  "classes_dtype": str(self.classes_.dtype),
                  "image_shape": list(self.image_shape_), "layers": _jsonable(layers)}
        (path / _CONFIG).write_text(json.dumps(config, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> DeepConvRFM:
        """Read a model written by ``save``; refuses other format versions and model types."""
        from safetensors.torch import load_file

        path = Path(path)
        config = _read_config(path, cls.__name__)
        params = dict(config["params"])
        params["ridges"] = tuple(params["ridges"])
        model = cls(**params)
        tensors = load_file(str(path / _TENSORS))
        model.layers_ = []
        for i, info in enumerate(config["layers"]):
            info = dict(info, M=tensors[f"layer{i}.M"], filters=tensors.get(f"layer{i}.filters"))
            model.layers_.append(info)
        model.classes_ = np.asarray(config["classes"], dtype=config["classes_dtype"])
        model.image_shape_ = tuple(config["image_shape"])
        model.final_ = ConvRFM.load(path / _FINAL)
        return model
