"""Deep ConvRFM (docs/math.md section 6): ConvRFM layers stacked through learned filter banks.

Layer l fits a ConvRFM of depth ``total_depth - l`` on its inputs and chooses M on validation;
the next layer's inputs are the bias-free q x q convolution of every image with ``width``
filters W = G M^p (G: seeded i.i.d. N(0, 1); p = ``filter_power``, 1/2 in the reference); no
non-linearity, the next kernel brings it (``activation="relu"`` rectifies each map as a CNN
does, so the chain of banks is no longer linear). With ``pool``, the convolved images are
pooled as a CNN pools between layers (average or max over non-overlapping windows), so each
later layer sees a coarser image with fewer positions, and every layer keeps the estimator's
depth.
A layer whose learned M did not beat M = I on validation keeps the random bank W = G. The final
predictor is the kernel regressor of the last layer.

Reference: Beaglehole et al., arXiv 2309.00570 (2023).
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted

from ray_convrfm.atomic import transaction
from ray_convrfm.backends import open_backend
from ray_convrfm.backends.chunks import FilterBank
from ray_convrfm.checks import as_images
from ray_convrfm.kernels.agop import psd_power
from ray_convrfm.kernels.patches import ACTIVATIONS, POOL_MODES, grid_shape
from ray_convrfm.models.batch import BatchPredictions, predict_to_parquet
from ray_convrfm.models.convrfm import ConvRFM, kernel_spec, register_holdouts
from ray_convrfm.models.inputs import prepare_fit_inputs, training_images
from ray_convrfm.models.persistence import (
    DIGEST,
    ModelFile,
    ModelFileError,
    hyper_parameters,
    jsonable,
    read_model,
    saved_digest,
    saved_parameter_names,
    write_model,
)
from ray_convrfm.models.rfm import fit_rfm
from ray_convrfm.options import as_options

log = logging.getLogger(__name__)

_FINAL = "final"

#: ``DeepConvRFM.filter_power``: W = G M^p. 1/4 (W^T W ~ AGOP^(1/2), the CNFA's relation) won on
#: validation over the reference's 1/2 on digits-noise, 2 layers: with 1/2 the second layer
#: kept M = I (validation 54.67 %, test 52.53 % at width 64), with 1/4 it learned (55.33 %,
#: test 55.22 %; width 32: 54.7 -> 55.3 % validation, 53.2 -> 56.9 % test).
FILTER_POWER = 0.25


class DeepConvRFM(ClassifierMixin, BaseEstimator):
    """Deep Convolutional Recursive Feature Machine.

    Parameters
    ----------
    estimator : the ``ConvRFM`` whose settings every layer uses (iterations, ridges, AGOP,
        solver, ``options``...), as scikit-learn's meta-estimators take an estimator; None
        means ``ConvRFM(iters=3)``. Per layer l its clone gets ``depth = total_depth - l`` and
        ``random_state + l``; with a kernel store, layer l's kernels go to ``store/layer<l>``.
        Its ``random_state`` (an integer) also seeds the validation split and the filters
        (``numpy.random.default_rng([random_state, l])``).
    layers : the most ConvRFM layers; the stack is chosen on validation (``layer_patience``)
    width : filters per learned filter bank
    total_depth : kernel depth of the first layer; layer l uses total_depth - l, so the number
        of convolutions stays constant (default: the last layer gets the estimator's depth)
    filter_power : the filter bank is W = G M^filter_power, so W^T W tracks M^(2 filter_power):
        1/2 is the reference's W^T W ~ M; 1/4 makes W^T W ~ AGOP^(1/2) for M = AGOP, the
        relation the CNFA finds in trained networks (docs/math.md sections 6 and 7)
    pool : pooling after each filter bank: an integer (p x p windows, stride p, for every
        layer; 1 none) or one integer per filter bank (``layers - 1`` of them). With pooling,
        and no ``total_depth``, every layer's kernel has the estimator's depth
    pool_mode : "avg" (average pooling) or "max"
    feature_basis : the ``patch_basis`` of every layer after the first, whose inputs are
        feature maps (None: the estimator's, as the first layer's). Max pooling or a rectifier
        leaves those patches spanning nearly all their d dimensions, so the exact span saves
        nothing; a share (0.99) keeps their leading principal directions and the layer cheap
        while the first layer keeps its exact basis (docs/math.md section 6)
    activation : "none" (the reference's linear bank) or "relu" (each filter's map rectified
        before pooling, as in a CNN; with average pooling the chain of banks is otherwise
        linear, so a deep stack is one kernel on a linear multi-scale patch map)
    layer_patience : stop adding layers once this many in a row did not beat the best
        validation accuracy so far, and keep the stack up to the best layer (a shallower one
        on ties), as iterations and ridges are chosen; None fits and keeps all ``layers``
    normalise : scale every filter so that its feature map (after pooling) has unit mean
        square over the training images and positions, as a CNN's normalisation layer does
        at inference; the saved filters carry the scale (docs/math.md section 6)

    Attributes
    ----------
    layers_ : one dict per layer: ``depth``, ``M`` (d, d), ``filters`` (width, C, q, q) or None
        for the last layer, ``learned`` (whether M beat M = I), ``best_iter``, ``ridge``,
        ``history`` (the layer's ConvRFM history), ``val_acc``, ``seconds`` (the layer's fit
        and featurisation). A layer does not depend on the layers after it, so with the same
        ``total_depth`` the first L layers are those of an L-layer stack
    final_ : the last kept layer's fitted ``ConvRFM``
    layer_val_acc_ : the validation accuracy of every layer fitted, kept or not
    classes_ : the class labels
    """

    def __init__(self, estimator: ConvRFM | None = None, layers: int = 3, width: int = 64,
                 total_depth: int | None = None, filter_power: float = FILTER_POWER,
                 pool: int | tuple[int, ...] = 1, pool_mode: str = "avg",
                 layer_patience: int | None = 1, normalise: bool = False,
                 activation: str = "none", feature_basis: str | float | None = None):
        self.estimator = estimator
        self.layers = layers
        self.width = width
        self.total_depth = total_depth
        self.filter_power = filter_power
        self.pool = pool
        self.pool_mode = pool_mode
        self.layer_patience = layer_patience
        self.normalise = normalise
        self.activation = activation
        self.feature_basis = feature_basis

    def _base(self) -> ConvRFM:
        if self.estimator is None:
            return ConvRFM(iters=3)
        if not isinstance(self.estimator, ConvRFM):
            raise TypeError(f"estimator must be a ConvRFM; found {type(self.estimator).__name__}")
        return clone(self.estimator)

    def _depths(self, base: ConvRFM) -> list[int]:
        for name in ("layers", "width"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; found {value!r}")
        power = self.filter_power
        if isinstance(power, bool) or not isinstance(power, numbers.Real) \
                or not 0 < float(power) <= 1:
            raise ValueError(f"filter_power must be a number in (0, 1]; found {power!r}")
        if not isinstance(self.normalise, bool | np.bool_):
            raise ValueError(f"normalise must be True or False; found {self.normalise!r}")
        patience = self.layer_patience
        if patience is not None and (not isinstance(patience, numbers.Integral)
                                     or isinstance(patience, bool) or patience < 1):
            raise ValueError(f"layer_patience must be a positive integer or None; found "
                             f"{patience!r}")
        if self.feature_basis is not None:
            try:
                clone(base).set_params(patch_basis=self.feature_basis).rfm_params()
            except ValueError as err:
                raise ValueError(f"feature_basis: {err} (None: the estimator's)") from None
        if not isinstance(base.random_state, numbers.Integral):
            raise ValueError(f"estimator.random_state must be an integer (it seeds the filter "
                             f"banks); found {base.random_state!r}")
        layers = int(self.layers)
        if self.total_depth is None and any(p > 1 for p in self._pools()):
            return [int(base.depth)] * layers  # pooled: every layer keeps its own depth
        total = base.depth + layers - 1 if self.total_depth is None else int(self.total_depth)
        depths = [total - layer for layer in range(layers)]
        if depths[-1] < 1:
            raise ValueError(f"total_depth {total} leaves layer {layers - 1} a kernel of "
                             f"depth {depths[-1]}; it must be at least layers ({layers})")
        return depths

    def _pools(self) -> list[int]:
        """The pooling window after each of the ``layers - 1`` filter banks, checked."""
        banks = int(self.layers) - 1
        pools = [self.pool] * banks if isinstance(self.pool, numbers.Integral) \
            and not isinstance(self.pool, bool) else list(np.atleast_1d(self.pool).tolist())
        if len(pools) != banks or not all(isinstance(p, int) and not isinstance(p, bool)
                                          and p >= 1 for p in pools):
            raise ValueError(f"pool must be a positive integer or {banks} of them (one per "
                             f"filter bank); found {self.pool!r}")
        if self.pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES}; found {self.pool_mode!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; found "
                             f"{self.activation!r}")
        return pools

    def _layer_estimator(self, base: ConvRFM, layer: int, depth: int) -> ConvRFM:
        """Layer ``layer``'s ConvRFM: the estimator with its depth, seed and patch basis."""
        rfm = clone(base).set_params(depth=depth, random_state=int(base.random_state) + layer)
        if layer > 0 and self.feature_basis is not None:
            rfm.set_params(patch_basis=self.feature_basis)
        return rfm

    def _bank(self, filters: torch.Tensor, padding: bool, pool: int) -> FilterBank:
        """One link of the feature map: ``filters``, then this stack's activation and pooling."""
        return FilterBank(filters.numpy(), bool(padding), int(pool), self.pool_mode,
                          self.activation)

    def _layer_shapes(self, base: ConvRFM, depths: list[int],
                      image_shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """(C, H, W) of every layer's inputs, each checked against its kernel's windows before
        anything is computed (a ``ValueError`` naming the layer)."""
        q, padding = base.rfm_params().kernel.patch_size, bool(base.padding)
        C, H, W = (int(s) for s in image_shape)
        shapes = []
        pools = [*self._pools()[: len(depths) - 1], 1]  # depths: all layers, or the kept ones
        for layer, (depth, pool) in enumerate(zip(depths, pools, strict=True)):
            try:
                base.rfm_params(depth).kernel.grids(H, W)
            except ValueError as err:
                raise ValueError(f"layer {layer} sees images of {H} x {W} (pool "
                                 f"{self.pool!r}): {err}") from err
            shapes.append((C, H, W))
            H, W = grid_shape(H, W, q, padding)
            C, H, W = int(self.width), H // pool, W // pool
        return shapes

    def _filters(self, M: torch.Tensor, channels: int, q: int, layer: int, learned: bool,
                 seed: int) -> torch.Tensor:
        G = np.random.default_rng([seed, layer]).standard_normal((int(self.width),
                                                                   channels * q * q))
        W = torch.from_numpy(G)
        if learned:
            W = W @ psd_power(M, float(self.filter_power))
        return W.reshape(int(self.width), channels, q, q).to(torch.float32)

    def _normalised(self, backend, filters: torch.Tensor, padding: bool,
                    pool: int) -> torch.Tensor:
        """``filters`` scaled so that each one's (pooled) feature map has unit mean square
        over the training images; average and max pooling commute with a positive scale. A
        filter whose map is zero everywhere is left as it is."""
        bank = self._bank(filters, padding, pool)
        mean_square = torch.from_numpy(backend.channel_mean_squares(bank))
        scale = torch.where(mean_square > 0, mean_square.rsqrt(), torch.ones_like(mean_square))
        return (filters.double() * scale[:, None, None, None]).to(filters.dtype)

    def fit(self, X, y=None, X_val=None, y_val=None, monitor=None) -> DeepConvRFM:
        """Fit every layer in turn; same arguments as ``ConvRFM.fit``. Returns self.

        The training images go to the backend once; after each layer it featurises them where
        they are (on Ray, every worker its own shard), so they never return to this process.
        """
        base = self._base()
        base.rfm_params().refuse_ignored()
        depths = self._depths(base)
        seed = int(base.random_state)
        options = as_options(base.options)
        rng = np.random.default_rng(seed)  # as ConvRFM's: layer 0 is that ConvRFM's fit
        data = prepare_fit_inputs(X, y, X_val, y_val, monitor, base.val_fraction, rng)
        self._layer_shapes(base, depths, data.X.shape[1:])  # every layer's images big enough
        pools = self._pools()
        device, spec = kernel_spec(base.rfm_params(depths[0]).kernel, options.compute, data.X)
        if getattr(self, "final_", None) is not None:
            self.final_.close()
        backend = open_backend(training_images(data.X_fit, spec.torch_dtype, device), options,
                               device)
        self.classes_ = data.classes
        self.image_shape_ = tuple(int(s) for s in data.X.shape[1:])
        self.layers_, self.layer_val_acc_, fitted = [], [], []
        url = options.store.url
        patience = None if self.layer_patience is None else int(self.layer_patience)
        best = 0
        try:
            for layer, depth in enumerate(depths):
                t0 = time.perf_counter()
                rfm = self._layer_estimator(base, layer, depth)
                params = rfm.rfm_params()
                backend.configure(dataclasses.replace(spec, params=params.kernel),
                                  f"{url.rstrip('/')}/layer{layer}" if url else None)
                if layer == 0:  # held-out sets are featurised with the training images
                    watched = register_holdouts(backend, data, spec)
                result = fit_rfm(backend, data.y_fit, len(data.classes), "validation", params,
                                 rng if layer == 0 else np.random.default_rng(seed + layer),
                                 monitor=watched,
                                 verbose=options.verbose)
                rfm.classes_ = self.classes_
                rfm.set_result(result, backend.row_shape)
                info = {"depth": depth, "M": rfm.M_, "filters": None,
                        "learned": rfm.best_iter_ > 0, "best_iter": rfm.best_iter_,
                        "ridge": rfm.ridge_, "history": rfm.history_,
                        "val_acc": rfm.history_[rfm.best_iter_]["val_acc"]}
                log.info("layer %d (kernel depth %d): val acc %.4f, iteration %d chosen%s",
                         layer, depth, info["val_acc"], rfm.best_iter_,
                         "" if info["learned"] else " (M = I: random filters)")
                self.layers_.append(info)
                self.layer_val_acc_.append(info["val_acc"])
                fitted.append(rfm)
                if info["val_acc"] > self.layer_val_acc_[best]:
                    best = layer
                stalled = patience is not None and layer - best >= patience
                if layer < len(depths) - 1 and not stalled:
                    filters = self._filters(rfm.M_, backend.row_shape[0],
                                            params.kernel.patch_size, layer, info["learned"],
                                            seed)
                    if self.normalise:
                        filters = self._normalised(backend, filters, bool(base.padding),
                                                   pools[layer])
                    info["filters"] = filters
                    backend.featurise(self._bank(filters, bool(base.padding), pools[layer]))
                info["seconds"] = time.perf_counter() - t0
                if stalled:
                    log.info("layer %d did not beat layer %d on validation in %d layer(s): "
                             "the stack stops at layer %d", layer, best, patience, best)
                    break
            # the best stack: up to the best layer, whose bank (if any) feeds nothing; without
            # a patience, every layer
            best = len(self.layers_) - 1 if patience is None else best
            self.layers_ = self.layers_[: best + 1]
            self.layers_[-1]["filters"] = None
            self.final_ = fitted[best]
            # the last layer's predictions reuse these workers, holding only its centers
            self.final_._keep_backend(backend.keep_for_predictions(self.final_.X_fit_),
                                      options.replace(store=None))
        except BaseException:
            backend.close()
            raise
        return self

    def close(self) -> None:
        """Release the workers the last layer keeps for predictions."""
        if getattr(self, "final_", None) is not None:
            self.final_.close()

    def __enter__(self) -> DeepConvRFM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _chain(self) -> list[FilterBank]:
        """The filter banks (and pooling) between the input and the last layer."""
        padding = bool(self.final_.padding)
        banks = self.layers_[:-1]
        return [self._bank(info["filters"], padding, pool)
                for info, pool in zip(banks, self._pools()[: len(banks)], strict=True)]

    def decision_function(self, X) -> np.ndarray:
        """Class scores of the last layer's kernel regressor, shape (n, n_classes); with Ray
        workers the images are featurised and scored on the workers."""
        check_is_fitted(self, "final_")
        X = as_images(X, "X", channels=self.image_shape_[0], image_size=self.image_shape_[1:])
        return self.final_.scores(X, self._chain())

    def predict(self, X) -> np.ndarray:
        """Predicted class labels, shape (n,)."""
        check_is_fitted(self, "final_")
        return self.classes_[self.decision_function(X).argmax(1)]

    def predict_to_parquet(self, X, out: str | Path, y=None,
                           overwrite: bool = False) -> BatchPredictions:
        """``ConvRFM.predict_to_parquet`` through the filter banks: each worker featurises
        and scores its own rows and writes its part of the predictions under ``out``."""
        check_is_fitted(self, "final_")
        return predict_to_parquet(self.final_, X, out, y, overwrite, self._chain(),
                                  self.image_shape_, type(self).__name__)

    def save(self, path: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` (metrics, filters) + ``final/`` (no pickle).

        The config records the digest of ``final/`` too, so the two are only loaded together.
        """
        check_is_fitted(self, "final_")
        path = Path(path)
        tensors = {f"layer{i}.M": info["M"] for i, info in enumerate(self.layers_)}
        tensors.update({f"layer{i}.filters": info["filters"]
                        for i, info in enumerate(self.layers_) if info["filters"] is not None})
        layers = [{k: v for k, v in info.items() if k not in ("M", "filters")}
                  for info in self.layers_]
        params = hyper_parameters(self)
        params["estimator"] = hyper_parameters(self._base())
        config = {"params": params, "classes": self.classes_.tolist(),
                  "classes_dtype": str(self.classes_.dtype),
                  "image_shape": list(self.image_shape_), "layers": layers,
                  "layer_val_acc": [float(v) for v in self.layer_val_acc_]}
        with transaction():  # final/ and this folder's files: replaced together, or none
            self.final_.save(path / _FINAL)
            config["final_digest"] = saved_digest(path / _FINAL)
            return write_model(path, type(self).__name__, config, tensors)

    @classmethod
    def load(cls, path: str | Path, options=None) -> DeepConvRFM:
        """Read a model written by ``save``; ``options`` say how to compute its predictions.

        Checked as ``ConvRFM.load`` checks (a ``ValueError`` naming the file), for the layers'
        metrics and filters, the ``final/`` model and their agreement: the final model must be
        the one saved with this config (its digest), with the last layer's depth, metric and
        feature shape.
        """
        path = Path(path)
        return read_model(path, cls.__name__,
                          lambda config, tensors, file: cls._from_saved(config, tensors,
                                                                        options, file))

    @classmethod
    def _from_saved(cls, config: dict, tensors: dict, options, file: ModelFile) -> DeepConvRFM:
        file.keys(config, "the config", {"format_version", "model", DIGEST, "params", "classes",
                                         "classes_dtype", "image_shape", "layers",
                                         "layer_val_acc", "final_digest"})
        hint = (" (a saved model holds no compute or cluster settings: pass them as options "
                "to load)")
        params = dict(file.keys(config["params"], "params", saved_parameter_names(cls),
                                hint=hint))
        layer_params = dict(file.keys(params.pop("estimator"), "params.estimator",
                                      saved_parameter_names(ConvRFM), hint=hint))
        if not isinstance(layer_params["ridges"], list):
            raise file.bad_config(f"params.estimator.ridges must be a list; found "
                                  f"{layer_params['ridges']!r}")
        layer_params["ridges"] = tuple(layer_params["ridges"])
        model = cls(estimator=ConvRFM(**layer_params, options=options), **params)
        base = model._base()
        model.classes_ = file.classes(config)
        model.image_shape_ = file.shape(config["image_shape"], "image_shape", 3)
        try:
            depths = model._depths(base)
            q = base.rfm_params().kernel.patch_size
        except (ValueError, TypeError) as err:
            raise file.bad_config(f"params: {err}") from err
        layers, tried = config["layers"], config["layer_val_acc"]
        if not isinstance(tried, list) or not 1 <= len(tried) <= len(depths):
            raise file.bad_config(f"layer_val_acc must list 1 to {len(depths)} accuracies "
                                  f"(params.layers); found {str(tried)[:80]}")
        model.layer_val_acc_ = [file.number(v, f"layer_val_acc[{i}]", 0.0)
                                for i, v in enumerate(tried)]
        if not isinstance(layers, list) or not 1 <= len(layers) <= len(tried):
            raise file.bad_config(f"layers must be a list of 1 to {len(tried)} records (the "
                                  f"layers fitted); found {str(layers)[:80]}")
        depths = depths[: len(layers)]  # the stack kept on validation
        try:
            shapes = model._layer_shapes(base, depths, model.image_shape_)
        except ValueError as err:
            raise file.bad_config(f"params: {err}") from err
        file.tensor_names(tensors, {f"layer{i}.M" for i in range(len(depths))}
                          | {f"layer{i}.filters" for i in range(len(depths) - 1)})
        width_ = int(model.width)
        model.layers_ = []
        for i, (info, depth) in enumerate(zip(layers, depths, strict=True)):
            what = f"layers[{i}]"
            info = dict(file.keys(info, what, {"depth", "learned", "best_iter", "ridge",
                                               "history", "val_acc"}, optional={"seconds"}))
            if file.integer(info["depth"], f"{what}.depth") != depth:
                raise file.bad_config(f"{what}.depth is {info['depth']}; params give {depth}")
            if not isinstance(info["learned"], bool):
                raise file.bad_config(f"{what}.learned must be true or false; found "
                                      f"{info['learned']!r}")
            history = file.history(info["history"], f"{what}.history", int(base.iters))
            file.integer(info["best_iter"], f"{what}.best_iter", 0, len(history) - 1)
            file.number(info["ridge"], f"{what}.ridge", 0.0)
            file.number(info["val_acc"], f"{what}.val_acc", 0.0)
            if "seconds" in info:
                file.number(info["seconds"], f"{what}.seconds", 0.0)
            channels = shapes[i][0]
            d = channels * q * q
            info["M"] = file.tensor(tensors, f"layer{i}.M", (d, d), psd=True)
            info["filters"] = None
            if i < len(depths) - 1:
                info["filters"] = file.tensor(tensors, f"layer{i}.filters",
                                              (width_, channels, q, q))
            model.layers_.append(info)
        channels, height, width = shapes[-1]
        final = ConvRFM.load(file.path / _FINAL, options=options)
        if saved_digest(file.path / _FINAL) != config["final_digest"]:
            raise ModelFileError(f"{file.path / _FINAL} is not the final model saved with "
                                 f"{file.config_file} (its digest differs from final_digest)")
        expected = hyper_parameters(model._layer_estimator(base, len(depths) - 1, depths[-1]))
        problems = [f"params {k}" for k, v in expected.items()
                    if jsonable(v) != jsonable(hyper_parameters(final)[k])]
        if tuple(final.image_shape_) != (channels, height, width):
            problems.append(f"image_shape {list(final.image_shape_)} (the layers give "
                            f"{[channels, height, width]})")
        if not np.array_equal(final.classes_, model.classes_):
            problems.append("classes")
        if not torch.equal(final.M_, model.layers_[-1]["M"]):
            problems.append(f"M (layer{len(depths) - 1}.M differs)")
        if problems:
            raise ModelFileError(f"{file.path / _FINAL} does not match {file.config_file}: "
                                 f"its {', '.join(problems)}")
        model.final_ = final
        return model



