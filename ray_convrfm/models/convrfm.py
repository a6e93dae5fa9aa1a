"""ConvRFM estimator (docs/math.md section 5), scikit-learn style.

Reference: Beaglehole, Radhakrishnan, Pandit, Belkin, "Mechanism of feature learning in
convolutional neural networks", arXiv 2309.00570 (2023).
"""

from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from ray_convrfm.backends import KernelSpec, ShardedBackend, open_backend
from ray_convrfm.checks import as_images
from ray_convrfm.data.ondisk import DiskImages, DiskRows
from ray_convrfm.kernels.devices import resolve_device, resolve_dtype_for
from ray_convrfm.kernels.kernel import KernelParams
from ray_convrfm.models.batch import BatchPredictions, predict_to_parquet
from ray_convrfm.models.inputs import (
    FitInputs,
    is_pixels,
    prepare_fit_inputs,
    training_images,
)
from ray_convrfm.models.lifecycle import KeepsWorkers
from ray_convrfm.models.persistence import (
    DIGEST,
    FORMAT_VERSION,
    ModelFile,
    hyper_parameters,
    read_model,
    saved_parameter_names,
    write_model,
)
from ray_convrfm.models.rfm import RFMParams, RFMResult, fit_rfm
from ray_convrfm.options import ComputeOptions, Options, as_options

__all__ = ["FORMAT_VERSION", "ConvRFM"]

#: The defaults of every per-layer learning parameter (declared once, in ``RFMParams``).
_D = RFMParams()

#: What ``save`` writes into ``config.json`` besides the format version, type and digest.
_CONFIG_KEYS = {"params", "classes", "classes_dtype", "ridge", "kernel_scale", "best_iter",
                "image_shape", "history", "center_indices"}


class ConvRFM(KeepsWorkers, ClassifierMixin, BaseEstimator):
    """Convolutional Recursive Feature Machine: a convolutional NTK that learns its patch metric.

    Iterates: kernel ridge regression with the kernel K_M (docs/math.md section 2), then
    M <- AGOP^power of that predictor w.r.t. image patches (section 4), and keeps the M and ridge
    with the best accuracy on validation data carved from the training set (section 5).

    Parameters
    ----------
    depth, patch_size, padding : the convolutional network whose NTK is the kernel
    iters : the most kernels fitted (M_0 = I, the fixed CNTK, then up to iters-1 learned
        metrics); ``patience`` stops earlier
    ridges : ridge values tried at every iteration, on the kernel divided by its largest entry
    agop_samples : training images at which the AGOP is taken (the reference used 20)
    agop_power : M = AGOP^power (1 by default; 1/2 matches W^T W of a network, section 7)
    metric_floor : every eigenvalue of M is raised to at least this share of the largest (0:
        none); bounds M's condition number, so repeated iterations cannot collapse M onto one
        direction (docs/math.md section 5)
    agop_classes : "auto" (the exact AGOP up to 64 classes, a 64-column sketch beyond), an
        int k (k Gaussian combinations of the class outputs: an unbiased AGOP at k/c of the
        cost; exact when k >= c) or "all" (docs/math.md 4a); seeded by ``random_state``
    val_fraction : share of the training data held out for choosing ridge and iteration when no
        validation set is passed to ``fit``
    patch_basis : "auto" works in an orthonormal basis of the training patches' span when they
        span fewer than d dimensions (features of a linear conv layer do; raw images do not),
        which is exact for inputs in that span and far cheaper; "full" always uses all d; a
        share in (0, 1) (as PCA's ``n_components=0.95``) keeps only the leading principal
        directions of the patches holding that share of their energy: an approximation that
        makes layers whose patches spread thinly over many dimensions cheaper (docs/math.md 6)
    solver : "exact" (Cholesky of the n x n kernel), "nystrom" (m centers, a seeded uniform
        sample of the training images, solved by Falkon-preconditioned conjugate gradient over
        rows of K_nm that stay with the backend; section 9a) or "nystrom-direct" (the same
        problem through its m x m normal equations and a Cholesky, for small m)
    centers : m for the Nystrom solver (default min(n, ``options.DEFAULT_CENTERS``)); fit
        refuses it with ``solver="exact"`` (no effect there)
    patience : stop after this many iterations without a better validation score (``iters``
        is then the maximum; by default 10 iterations, stopping 2 after the best); None runs
        all ``iters``. Scores compare accuracy first, then the squared error on the one-hot
        targets, so equal accuracies do not hide a better fit. On Fashion-MNIST in a 42 x 42
        noise frame (n = 2,000) validation accuracy rose to iteration 6 (27.0 -> 41.0 %) and
        collapsed at iteration 8 (11 %): a fixed 5 stopped early, a fixed 10 would need the
        choice on validation to avoid the collapse
    random_state : seed of the validation split and the AGOP sample (a local generator)
    options : how and where to compute (``ray_convrfm.Options``: dtype, device, engine, memory
        budget, Ray workers and cluster address, kernel store, progress); None: in this
        process, in the input's precision. It never changes what is learned beyond rounding.

    Attributes
    ----------
    M_ : (d, d) the chosen metric, d = C * patch_size**2
    alpha_ : (m, n_classes) coefficients on the normalised kernel
    ridge_, best_iter_, kernel_scale_ : the chosen ridge, iteration and kernel normaliser
    history_ : one dict per iteration (validation accuracy per ridge, train MSE, seconds spent)
    M_path_ : the metric used at every iteration (M_path_[0] is the identity)
    classes_ : the class labels
    X_fit_ : the images the predictor is built on (the training images without the validation
        part, or the Nystrom centers), as stored: uint8 when fitted on 8-bit pixels
    center_indices_ : the Nystrom centers' rows among the training images, or None
    patch_basis_ : (d, r) orthonormal basis the patches are expressed in, or None (all of R^d)
    timings_ : seconds per distributed stage (loading shards, computing, reducing)

    Examples
    --------
    >>> from ray_convrfm import ConvRFM
    >>> from ray_convrfm.data.datasets import load_digits
    >>> ds = load_digits()
    >>> model = ConvRFM(depth=2, iters=2).fit(ds.X_train[:300], ds.y_train[:300])
    >>> round(model.score(ds.X_test, ds.y_test), 2) > 0.8
    True
    """

    # the defaults are declared once, in RFMParams (and KernelParams); the CLI takes them here
    def __init__(self, depth: int = _D.kernel.depth, patch_size: int = _D.kernel.patch_size,
                 padding: bool = _D.kernel.padding, iters: int = _D.iters,
                 ridges: tuple[float, ...] = _D.ridges, agop_samples: int = _D.agop_samples,
                 agop_power: float = _D.agop_power, metric_floor: float = _D.metric_floor,
                 val_fraction: float = 0.1, patch_basis: str | float = _D.patch_basis,
                 solver: str = _D.solver, centers: int | None = _D.centers,
                 patience: int | None = _D.patience, agop_classes: str | int = _D.agop_classes,
                 random_state: int | None = 0, options: Options | None = None):
        self.depth = depth
        self.patch_size = patch_size
        self.padding = padding
        self.iters = iters
        self.ridges = ridges
        self.agop_samples = agop_samples
        self.agop_power = agop_power
        self.metric_floor = metric_floor
        self.val_fraction = val_fraction
        self.patch_basis = patch_basis
        self.solver = solver
        self.centers = centers
        self.patience = patience
        self.agop_classes = agop_classes
        self.random_state = random_state
        self.options = options

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, X_val=None, y_val=None, monitor=None) -> ConvRFM:
        """Fit the kernel machine and learn M.

        Parameters
        ----------
        X : (n, C, H, W) training images, or an on-disk set (``data.ondisk.DiskImages``:
            ``data.parquet.ParquetImages``, also of Hugging Face shards through ``open_hf``;
            ``data.folder_tree.FolderImages``): each Ray worker then reads its own rows;
            validation is held out in whole row groups of a parquet set
        y : (n,) labels (at least two classes); None with an on-disk set (stored labels)
        X_val, y_val : optional validation data for choosing ridge and iteration; by default
            ``val_fraction`` of (X, y) is held out (stratified, seeded by ``random_state``)
        monitor : optional (X, y) evaluated at every iteration for reporting only (recorded as
            ``monitor_acc`` in ``history_``); it never influences any choice

        Returns
        -------
        self
        """
        params = self.rfm_params()
        params.refuse_ignored()
        options = as_options(self.options)
        rng = np.random.default_rng(self.random_state)
        data = prepare_fit_inputs(X, y, X_val, y_val, monitor, self.val_fraction, rng)
        params.kernel.grids(*data.X.shape[2:])  # image large enough for patch and depth
        device, spec = kernel_spec(params.kernel, options.compute, data.X)
        self.close()
        backend = open_backend(training_images(data.X_fit, spec.torch_dtype, device), options,
                               device)
        try:
            backend.configure(spec, options.store.url)
            monitor = register_holdouts(backend, data, spec)
            result = fit_rfm(backend, data.y_fit, len(data.classes), "validation", params, rng,
                             monitor=monitor, verbose=options.verbose)
            self.classes_ = data.classes
            self.set_result(result, tuple(data.X.shape[1:]))
            self._keep_backend(backend.keep_for_predictions(result.centers),
                               options.replace(store=None))
        except BaseException:
            backend.close()
            raise
        return self

    def rfm_params(self, depth: int | None = None) -> RFMParams:
        """This estimator's hyper-parameters, checked (``depth`` overrides its own)."""
        kernel = KernelParams(_as_int(self.depth if depth is None else depth),
                              _as_int(self.patch_size), bool(self.padding))
        return RFMParams(kernel=kernel, iters=self.iters, ridges=self.ridges,
                         agop_samples=self.agop_samples, agop_power=self.agop_power,
                         metric_floor=self.metric_floor, patch_basis=self.patch_basis,
                         solver=self.solver, centers=self.centers,
                         patience=self.patience, agop_classes=self.agop_classes)

    def set_result(self, result: RFMResult, image_shape: tuple[int, ...]) -> None:
        """Take the learned state from ``fit_rfm``'s result (used by ``DeepConvRFM`` layers)."""
        self.M_ = result.M
        self.alpha_ = result.alpha
        self.ridge_ = result.ridge
        self.kernel_scale_ = result.kernel_scale
        self.best_iter_ = result.best_iter
        self.history_ = result.history
        self.M_path_ = result.M_path
        self.X_fit_ = result.centers
        self.center_indices_ = result.center_indices
        self.patch_basis_ = result.patch_basis
        self.timings_ = result.timings
        self.image_shape_ = tuple(int(s) for s in image_shape)
        self.n_features_in_ = int(self.M_.shape[0])

    # ------------------------------------------------------------------ predict
    def decision_function(self, X) -> np.ndarray:
        """Class scores f(x) = sum_i alpha_i K_M(x_i, x) / scale, shape (n, n_classes).

        With ``options.cluster.workers`` the images are scored on Ray workers in blocks; only
        the scores come back.
        """
        check_is_fitted(self, "alpha_")
        X = as_images(X, "X", channels=self.image_shape_[0], image_size=self.image_shape_[1:])
        return self.scores(X, [])

    def scores(self, X, chain: list) -> np.ndarray:
        """Scores of images X after the filter banks ``chain`` ([(filters, padding), ...],
        Deep ConvRFM's feature map, applied where the images are scored)."""
        backend, coef = self.prediction_backend()
        return backend.scores(X, coef, None, chain)

    def predict_to_parquet(self, X, out: str | Path, y=None,
                           overwrite: bool = False) -> BatchPredictions:
        """Predict a whole data set where it lives: the rows are sharded over the model's
        workers, each loads its own (an on-disk set, ``DiskImages``: read and decoded there;
        an array: sent in blocks), scores them and writes its parquet part under folder
        ``out`` (``row``, ``predicted_label``, ``scores``, ``true_label`` with labels: ``y``
        or those stored), then ``_SUCCESS`` last (``data.predictions``). The driver never
        holds the scores. A folder holding files is refused unless ``overwrite``."""
        check_is_fitted(self, "alpha_")
        return predict_to_parquet(self, X, out, y, overwrite, [], self.image_shape_,
                                  type(self).__name__)

    def prediction_backend(self) -> tuple[ShardedBackend, torch.Tensor]:
        """The workers set up for this model's predictions (those kept since the fit, or
        opened once) and the coefficients on the normalised kernel."""
        check_is_fitted(self, "alpha_")
        options = as_options(self.options)
        compute = options.compute
        device = resolve_device(compute.device)
        spec = KernelSpec(self.rfm_params().kernel,
                          dtype=compute.dtype or str(resolve_dtype_for(self.X_fit_, None))
                          .removeprefix("torch."),
                          engine=compute.engine,
                          memory_budget_mb=compute.memory_budget_mb)
        dt = spec.torch_dtype
        options = options.replace(store=None)
        backend = self._kept_backend(options)
        if backend is None:  # loaded, closed, released, or other options: open workers, once
            backend = open_backend(training_images(self.X_fit_, dt, device), options, device)
            self._keep_backend(backend, options)
        if not self._backend_ready:
            Q = None if self.patch_basis_ is None else self.patch_basis_.to(device, dt)
            M = self.M_.to(device, dt)
            backend.configure(spec, None)
            backend.set_metric(M if Q is None else Q.T @ M @ Q, Q)
            self._backend_ready = True
        return backend, self.alpha_.to(device, torch.float64) / self.kernel_scale_

    def predict(self, X) -> np.ndarray:
        """Predicted class labels, shape (n,)."""
        check_is_fitted(self, "alpha_")
        return self.classes_[self.decision_function(X).argmax(1)]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path`` (no pickle),
        atomically: a failed write is an ``OSError`` naming the file and leaves the model that
        was there, or nothing.

        ``options`` are not saved: how and where to compute is the loader's choice.
        """
        check_is_fitted(self, "alpha_")
        config = {
            "params": hyper_parameters(self),
            "classes": self.classes_.tolist(),
            "classes_dtype": str(self.classes_.dtype),
            "ridge": self.ridge_,
            "kernel_scale": self.kernel_scale_,
            "best_iter": self.best_iter_,
            "image_shape": list(self.image_shape_),
            "history": self.history_,
            "center_indices": None if self.center_indices_ is None
            else [int(i) for i in self.center_indices_],
        }
        tensors = {"M": self.M_, "alpha": self.alpha_, "X_fit": self.X_fit_}
        tensors.update({f"M_path.{t}": M for t, M in enumerate(self.M_path_)})
        if self.patch_basis_ is not None:
            tensors["patch_basis"] = self.patch_basis_
        return write_model(path, type(self).__name__, config, tensors)

    @classmethod
    def load(cls, path: str | Path, options: Options | None = None) -> ConvRFM:
        """Read a model written by ``save``; ``options`` say how to compute its predictions.

        Nothing in the files is trusted: a ``ValueError`` (``persistence.ModelFileError``)
        naming the file refuses unreadable JSON or safetensors, other format versions, missing
        or unknown keys (compute and cluster settings are never read from a file), tensors
        that are missing, unexpected, not finite or shaped unlike the config, metrics that are
        not symmetric positive semi-definite, a kernel scale that is not positive, and content
        that does not match the digest recorded at save (an edited file).
        """
        return read_model(path, cls.__name__,
                          lambda config, tensors, file: cls.from_saved(config, tensors,
                                                                       options, file))

    @classmethod
    def from_saved(cls, config: dict, tensors: dict, options: Options | None,
                   file: ModelFile | None = None) -> ConvRFM:
        """The model of a parsed ``config.json`` and its tensors, every field checked against
        the others (``file`` names the files in errors; the digest is ``load``'s to verify)."""
        file = file or ModelFile("<saved model>")
        file.keys(config, "the config", _CONFIG_KEYS | {"format_version", "model", DIGEST})
        params = dict(file.keys(
            config["params"], "params", saved_parameter_names(cls),
            hint=" (a saved model holds no compute or cluster settings: pass them as "
                 "options to load)"))
        if not isinstance(params["ridges"], list):
            raise file.bad_config(f"params.ridges must be a list; found {params['ridges']!r}")
        params["ridges"] = tuple(params["ridges"])
        if not isinstance(params["padding"], bool):
            raise file.bad_config(f"params.padding must be true or false; found "
                                  f"{params['padding']!r}")
        model = cls(**params, options=options)
        try:
            rfm = model.rfm_params()
        except (ValueError, TypeError) as err:
            raise file.bad_config(f"params: {err}") from err
        kernel = rfm.kernel
        model.classes_ = file.classes(config)
        model.image_shape_ = file.shape(config["image_shape"], "image_shape", 3)
        channels, height, width = model.image_shape_
        try:
            kernel.grids(height, width)
        except ValueError as err:
            raise file.bad_config(f"image_shape {list(model.image_shape_)}: {err}") from err
        model.history_ = file.history(config["history"], "history", rfm.iters)
        iters = len(model.history_)
        model.best_iter_ = file.integer(config["best_iter"], "best_iter", 0, iters - 1)
        model.ridge_ = file.number(config["ridge"], "ridge", 0.0)
        model.kernel_scale_ = file.number(config["kernel_scale"], "kernel_scale", 0.0,
                                          strict=True)
        d, c = channels * kernel.patch_size**2, len(model.classes_)
        file.tensor_names(tensors, {"M", "alpha", "X_fit", *(f"M_path.{t}" for t in
                                                             range(iters))},
                          optional={"patch_basis"})
        model.M_ = file.tensor(tensors, "M", (d, d), psd=True)
        model.M_path_ = [file.tensor(tensors, f"M_path.{t}", (d, d), psd=True)
                         for t in range(iters)]
        model.X_fit_ = file.tensor(tensors, "X_fit", (None, *model.image_shape_), pixels=True)
        m = model.X_fit_.shape[0]
        if m < 1:
            raise file.bad_tensors("tensor X_fit holds no images")
        model.alpha_ = file.tensor(tensors, "alpha", (m, c))
        model.patch_basis_ = None
        if "patch_basis" in tensors:
            Q = file.tensor(tensors, "patch_basis", (d, None))
            gram = Q.T.to(torch.float64) @ Q.to(torch.float64)
            if not 1 <= Q.shape[1] <= d or not torch.allclose(
                    gram, torch.eye(Q.shape[1], dtype=torch.float64), atol=1e-4):
                raise file.bad_tensors(f"tensor patch_basis {tuple(Q.shape)} must have 1 to "
                                       f"{d} orthonormal columns")
            model.patch_basis_ = Q
        centers = config["center_indices"]
        if (centers is None) != (rfm.solver == "exact"):
            raise file.bad_config(f"center_indices must be given for the Nystrom solvers only; "
                                  f"found {str(centers)[:40]} with solver {rfm.solver!r}")
        if centers is not None:
            if not isinstance(centers, list) or len(centers) != m \
                    or len(set(file.integer(i, "center_indices", 0) for i in centers)) != m:
                raise file.bad_config(f"center_indices must be {m} distinct row numbers (one "
                                      f"per row of X_fit); found {str(centers)[:80]}")
            centers = np.asarray(centers)
        model.center_indices_ = centers
        model.n_features_in_ = d
        model.timings_ = {}
        return model


def kernel_spec(params: KernelParams, compute: ComputeOptions,
                X) -> tuple[torch.device, KernelSpec]:
    """The device and the kernel spec of a fit on images X (dtype None: X's own; the engine is
    resolved where the kernels are computed, ``KernelSpec.engine_on``)."""
    device = resolve_device(compute.device)
    if isinstance(X, DiskImages):  # an on-disk set: 8-bit pixels, computed in float32
        dtype = compute.dtype or "float32"
    else:
        dtype = str(resolve_dtype_for(X, compute.dtype)).removeprefix("torch.")
    spec = KernelSpec(params, dtype=dtype, engine=compute.engine,
                      memory_budget_mb=compute.memory_budget_mb)
    return device, spec


def register_holdouts(backend, data: FitInputs, spec: KernelSpec) -> str | None:
    """Give the backend the validation (and monitor) images, in the working dtype or as
    parquet rows its workers read: they stay where kernels are computed, and only scores per
    ridge come back. Returns the monitor set's name, or None."""
    def images(X):
        if isinstance(X, DiskRows) or is_pixels(X):  # on-disk rows, 8-bit pixels: as stored
            return X
        return X.to(spec.torch_dtype) if isinstance(X, torch.Tensor) \
            else np.asarray(X, dtype=spec.dtype)

    backend.holdout("validation", images(data.X_val), np.asarray(data.y_val))
    if data.X_mon is None:
        return None
    backend.holdout("monitor", images(data.X_mon), np.asarray(data.y_mon))
    return "monitor"


def _as_int(value):
    """numpy integers as int (``KernelParams`` checks the rest and names the field)."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) \
        else value
