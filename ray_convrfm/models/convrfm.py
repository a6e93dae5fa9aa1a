"""ConvRFM estimator (spec section 5), scikit-learn style.

Reference: Beaglehole, Radhakrishnan, Pandit, Belkin, "Mechanism of feature learning in
convolutional neural networks", arXiv 2309.00570 (2023).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import check_is_fitted

from ray_convrfm.backends.distributed import LocalKernels, RayKernels, ray_scores
from ray_convrfm.checks import as_images, as_labels
from ray_convrfm.kernels.agop import metric_from_agop
from ray_convrfm.kernels.devices import resolve_device, resolve_dtype, resolve_engine
from ray_convrfm.kernels.kernel import KernelParams, as_tensor
from ray_convrfm.kernels.patches import featurise
from ray_convrfm.kernels.solvers import (
    SingularKernelError,
    kernel_scale,
    solve_nystrom,
    solve_ridge,
)
from ray_convrfm.options import ComputeOptions

log = logging.getLogger(__name__)

#: Nystrom centres when ``centers`` is not given: an m x m Cholesky that takes seconds.
DEFAULT_CENTERS = 2000

#: Bumped whenever the saved layout changes; ``load`` refuses other versions.
FORMAT_VERSION = 1
_CONFIG = "config.json"
_TENSORS = "model.safetensors"


def _accuracy(scores: torch.Tensor, target: np.ndarray) -> float:
    return float((scores.argmax(1).cpu().numpy() == target).mean())


class ConvRFM(ClassifierMixin, BaseEstimator):
    """Convolutional Recursive Feature Machine: a convolutional NTK that learns its patch metric.

    Iterates: kernel ridge regression with the kernel K_M (spec section 2), then
    M <- AGOP^power of that predictor w.r.t. image patches (section 4), and keeps the M and ridge
    with the best accuracy on validation data carved from the training set (section 5).

    Parameters
    ----------
    depth, patch_size, padding : the convolutional network whose NTK is the kernel
    iters : number of kernels fitted (M_0 = I, the fixed CNTK, then iters-1 learned metrics)
    ridges : ridge values tried at every iteration, on the kernel divided by its largest entry
    agop_samples : training images at which the AGOP is taken (the reference used 20)
    agop_power : M = AGOP^power (1 by default; 1/2 matches W^T W of a network, spec section 7)
    val_fraction : share of the training data held out for choosing ridge and iteration when no
        validation set is passed to ``fit``
    patch_basis : "auto" works in an orthonormal basis of the training patches' span when they
        span fewer than d dimensions (features of a linear conv layer do; raw images do not), which
        is exact for inputs in that span and far cheaper; "full" always uses all d coordinates
    workers : 0 computes in this process; N > 0 spreads the training images over N Ray actors
        (same kernel and AGOP code, spec section 9)
    address : None starts an embedded local Ray sized to ``workers``; "auto" or "ray://..."
        joins that cluster
    store : path or fsspec URL of a zarr store for the kernel blocks (needs workers >= 1); a
        rerun with the same inputs computes only the blocks not yet stored
    solver : "exact" (Cholesky of the n x n kernel) or "nystrom" (m centres, a seeded uniform
        sample of the training images; only m x m systems, spec section 9)
    centers : m for the Nystrom solver (default min(n, 2000))
    gpus_per_worker : GPUs reserved per worker; None: 1 when the Ray cluster has GPUs, else 0
    placement_timeout_s : how long to wait for the cluster to provide the workers (an
        autoscaler starting nodes) before giving up with an error; None waits forever
    device, dtype, engine, memory_budget_mb : see ``ComputeOptions``
    random_state : seed of the validation split and the AGOP sample (a local generator)
    verbose : show progress bars and log one line per iteration

    Attributes
    ----------
    M_ : (d, d) the chosen metric, d = C * patch_size**2
    alpha_ : (n_fit, n_classes) coefficients on the normalised kernel
    ridge_, best_iter_, kernel_scale_ : the chosen ridge, iteration and kernel normaliser
    history_ : one dict per iteration (validation accuracy per ridge, train MSE, seconds spent)
    M_path_ : the metric used at every iteration (M_path_[0] is the identity)
    classes_ : the class labels
    X_fit_ : the training images the predictor is built on (the validation part excluded)
    patch_basis_ : (d, r) orthonormal basis the patches are expressed in, or None (all of R^d)

    Examples
    --------
    >>> from ray_convrfm import ConvRFM
    >>> from ray_convrfm.data.datasets import load_digits
    >>> ds = load_digits()
    >>> model = ConvRFM(depth=2, iters=2).fit(ds.X_train[:300], ds.y_train[:300])
    >>> round(model.score(ds.X_test, ds.y_test), 2) > 0.8
    True
    """

    def __init__(self, depth: int = 3, patch_size: int = 3, padding: bool = False,
                 iters: int = 5, ridges: tuple[float, ...] = (1e-8, 1e-5, 1e-3),
                 agop_samples: int = 256, agop_power: float = 1.0, val_fraction: float = 0.1,
                 patch_basis: str = "auto", workers: int = 0, address: str | None = None,
                 store: str | None = None, solver: str = "exact", centers: int | None = None,
                 gpus_per_worker: float | None = None, placement_timeout_s: float | None = 600,
                 device: str = "auto", dtype: str = "float32",
                 engine: str = "auto",
                 memory_budget_mb: int = 512, random_state: int | None = 0,
                 verbose: bool = False):
        self.depth = depth
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

    # ------------------------------------------------------------------ helpers
    def _options(self) -> ComputeOptions:
        return ComputeOptions(dtype=self.dtype, device=self.device, engine=self.engine,
                              memory_budget_mb=self.memory_budget_mb)

    def _context(self):
        opts = self._options()
        dev = resolve_device(opts.device)
        return (dev, resolve_dtype(opts.dtype), resolve_engine(opts.engine, dev),
                opts.memory_budget_mb)

    def _check_params(self) -> KernelParams:
        params = KernelParams(self.depth, self.patch_size, self.padding)
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"iters must be a positive integer; found {self.iters!r}")
        ridges = tuple(float(r) for r in np.atleast_1d(self.ridges))
        if not ridges or min(ridges) < 0:
            raise ValueError(f"ridges must be a non-empty list of values >= 0; found {self.ridges}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1); found {self.val_fraction}")
        if not isinstance(self.agop_samples, int) or self.agop_samples < 1:
            raise ValueError(f"agop_samples must be a positive integer; found "
                             f"{self.agop_samples!r}")
        if self.agop_power <= 0:
            raise ValueError(f"agop_power must be positive; found {self.agop_power}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an integer >= 0; found {self.workers!r}")
        if self.solver not in ("exact", "nystrom"):
            raise ValueError(f"solver must be 'exact' or 'nystrom'; found {self.solver!r}")
        if self.centers is not None and (not isinstance(self.centers, int) or self.centers < 1):
            raise ValueError(f"centers must be a positive integer; found {self.centers!r}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0; found {self.gpus_per_worker}")
        if self.store and not self.workers:
            raise ValueError("store= needs workers >= 1: the workers write the kernel blocks")
        if self.patch_basis not in ("auto", "full"):
            raise ValueError(f"patch_basis must be 'auto' or 'full'; found {self.patch_basis!r}")
        return params

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, X_val=None, y_val=None, monitor=None) -> ConvRFM:
        """Fit the kernel machine and learn M.

        Parameters
        ----------
        X : (n, C, H, W) training images, or ``parquet.ParquetImages`` (each Ray worker then
            reads its own rows; validation is held out in whole row groups)
        y : (n,) labels (at least two classes); None with ``ParquetImages`` (stored labels)
        X_val, y_val : optional validation data for choosing ridge and iteration; by default
            ``val_fraction`` of (X, y) is held out (stratified, seeded by ``random_state``)
        monitor : optional (X, y) evaluated at every iteration for reporting only (recorded as
            ``monitor_acc`` in ``history_``); it never influences any choice

        Returns
        -------
        self
        """
        params = self._check_params()
        rng = np.random.default_rng(self.random_state)
        data = prepare_fit_inputs(self, X, y, X_val, y_val, monitor, rng)
        X, X_fit, y_fit, X_val, y_val = data.X, data.X_fit, data.y_fit, data.X_val, data.y_val
        X_mon, y_mon = data.X_mon, data.y_mon
        params.grids(X.shape[2], X.shape[3])  # image large enough for patch and depth

        dev, dt, eng, budget = self._context()
        Xf = _training_images(X_fit, self.workers, dt, dev)
        Xv = as_tensor(X_val, dt, dev)
        Xm = as_tensor(X_mon, dt, dev) if X_mon is not None else None
        kernels = self._backend(Xf, params)
        try:
            self._fit_backend(kernels, y_fit, Xv, y_val, Xm, y_mon, rng, X.shape[1:])
        finally:
            kernels.close()
        return self

    def _backend(self, Xf, params: KernelParams):
        """Where the kernels of training images Xf are computed: here, or on Ray workers
        (Xf a tensor, or ``ParquetRows`` that the workers read themselves)."""
        dev, dt, eng, budget = self._context()
        if self.workers:
            return RayKernels.start(Xf, params, eng, budget, self.workers, self.address,
                                    self.gpus_per_worker, self.store, self.verbose,
                                    placement_timeout_s=self.placement_timeout_s, dtype=dt,
                                    device=dev)
        return LocalKernels(Xf, params, eng, budget, self.verbose)

    def _fit_backend(self, kernels, y_fit: np.ndarray, Xv: torch.Tensor, y_val: np.ndarray,
                     Xm: torch.Tensor | None, y_mon: np.ndarray | None,
                     rng: np.random.Generator, image_shape: tuple[int, ...]) -> None:
        """Fit on training images held by ``kernels`` (labels: indices into ``classes_``)."""
        ridges = tuple(float(r) for r in np.atleast_1d(self.ridges))
        dev, dt, _, _ = self._context()
        n, c = kernels.n, len(self.classes_)
        Y = torch.zeros(n, c, dtype=torch.float64, device=dev)
        Y[torch.arange(n), torch.as_tensor(y_fit, device=dev)] = 1.0
        sample_idx = np.sort(rng.choice(n, size=min(self.agop_samples, n), replace=False))
        center_idx = None
        if self.solver == "nystrom":
            m = min(n, self.centers or DEFAULT_CENTERS)
            center_idx = np.sort(rng.choice(n, size=m, replace=False))
        d = int(image_shape[0]) * self.patch_size**2
        Q = kernels.patch_span() if self.patch_basis == "auto" else None
        if Q is not None:
            log.info("training patches span %d of %d dimensions: working in that basis",
                     Q.shape[1], d)
            Q = Q.to(dev, dt)
        kernels.set_basis(Q)
        M = torch.eye(d if Q is None else Q.shape[1], dtype=dt, device=dev)  # Q^T I Q = I_r
        self.n_features_in_ = d
        self.image_shape_ = tuple(int(s) for s in image_shape)
        self.history_ = []
        self.M_path_ = []
        self._iterate(kernels, M, Q, Xv, Xm, Y, y_val, y_mon, sample_idx, center_idx, ridges, dt)
        # seconds per distributed stage (loading shards, computing, reducing): for benchmarks
        self.timings_ = dict(getattr(getattr(kernels, "shards", None), "timings", {}))
        # the predictor's centres: every training image, or the Nystrom centres
        self.X_fit_ = kernels.centres(center_idx).cpu()
        self.center_indices_ = center_idx
        self.patch_basis_ = None if Q is None else Q.cpu()

    def _iterate(self, kernels, M, Q, Xv, Xm, Y, y_val, y_mon, sample_idx, center_idx, ridges,
                 dt) -> None:
        """The ConvRFM loop of spec section 5 on a kernel backend (local or Ray)."""
        best = None
        for it in range(self.iters):
            self.M_path_.append(_full_metric(M, Q).cpu())
            t0 = time.perf_counter()
            blocks_before = getattr(kernels, "blocks_computed", 0)
            kernels.set_metric(M)
            stages = {}
            if center_idx is None:  # exact: the full training kernel
                K = kernels.train_kernel(desc=f"iter {it}: train kernel")
                scale = kernel_scale(K)
                K /= scale
                stages["train_kernel"] = time.perf_counter() - t0
                Kv = kernels.cross_kernel(Xv, desc=f"iter {it}: val kernel") / scale
                Kmon = None
                if Xm is not None:
                    Kmon = kernels.cross_kernel(Xm, desc=f"iter {it}: monitor kernel") / scale
                K64 = K.to(torch.float64)

                def solve(ridge, K=K):
                    return solve_ridge(K, Y, ridge)

                def mse(alpha, K64=K64):
                    return float(((K64 @ alpha - Y) ** 2).mean())
            else:  # Nystrom: only m x m sums of the rows' normal equations (spec section 9)
                KtK, KtY, K_mm = kernels.nystrom_system(center_idx, Y)
                scale = kernel_scale(K_mm)
                KtK, KtY, K_mm = KtK / scale**2, KtY / scale, K_mm / scale
                stages["normal_equations"] = time.perf_counter() - t0
                Kv = kernels.cross_centres(Xv, center_idx) / scale
                Kmon = None
                if Xm is not None:
                    Kmon = kernels.cross_centres(Xm, center_idx) / scale

                def solve(ridge, KtK=KtK, KtY=KtY, K_mm=K_mm):
                    return solve_nystrom(KtK, KtY, K_mm, ridge)

                def mse(alpha, KtK=KtK, KtY=KtY):
                    # ||K alpha - Y||^2 from the normal equations, without K_nm
                    sq = (Y**2).sum() - 2 * (alpha * KtY).sum() + (alpha * (KtK @ alpha)).sum()
                    return float(sq / Y.numel())
            t_kernel = time.perf_counter() - t0

            t0 = time.perf_counter()
            record = {"iter": it, "val_acc_by_ridge": {}, "failed_ridges": []}
            chosen = None
            for ridge in ridges:
                try:
                    alpha = solve(ridge)
                except SingularKernelError as err:
                    record["failed_ridges"].append(ridge)
                    log.info("iteration %d: %s", it, err)
                    continue
                val_acc = _accuracy(Kv.to(torch.float64) @ alpha, y_val)
                record["val_acc_by_ridge"][repr(ridge)] = val_acc
                if chosen is None or val_acc > chosen[1]:
                    chosen = (ridge, val_acc, alpha)
            if chosen is None:
                raise SingularKernelError(
                    f"iteration {it}: every ridge in {ridges} failed; pass larger ridges"
                )
            ridge, val_acc, alpha = chosen
            train_mse = mse(alpha)
            t_solve = time.perf_counter() - t0
            record.update(ridge=ridge, val_acc=val_acc, train_mse=train_mse,
                          seconds_kernel=t_kernel, seconds_solve=t_solve,
                          **{f"seconds_{k}": v for k, v in stages.items()})
            if self.store:
                record["stored_blocks_computed"] = kernels.blocks_computed - blocks_before
            if hasattr(kernels, "shards"):
                record["worker_peak_rss_mb"] = kernels.shards.peak_rss_mb()
                record["worker_nodes"] = kernels.shards.nodes()
            if Kmon is not None:
                record["monitor_acc"] = _accuracy(Kmon.to(torch.float64) @ alpha, y_mon)
            if best is None or val_acc > best["val_acc"]:
                best = {"val_acc": val_acc, "iter": it, "M": M.clone(), "alpha": alpha,
                        "ridge": ridge, "scale": scale}

            t0 = time.perf_counter()
            if it < self.iters - 1:
                G = kernels.agop((alpha / scale).to(dt), sample_idx, center_idx)
                M = metric_from_agop(G, self.agop_power)
            record["seconds_agop"] = time.perf_counter() - t0
            self.history_.append(record)
            if self.verbose:
                mon = record.get("monitor_acc")
                log.info("iter %d  ridge %g  val acc %.4f%s  train mse %.3g  kernel %.1fs  "
                         "solve %.1fs  AGOP %.1fs", it, ridge, val_acc,
                         "" if mon is None else f"  monitor acc {mon:.4f}", train_mse, t_kernel,
                         t_solve, record["seconds_agop"])

        self.M_ = _full_metric(best["M"], Q).cpu()
        self.alpha_ = best["alpha"].cpu()
        self.ridge_ = best["ridge"]
        self.kernel_scale_ = best["scale"]
        self.best_iter_ = best["iter"]

    # ------------------------------------------------------------------ predict
    def decision_function(self, X) -> np.ndarray:
        """Class scores f(x) = sum_i alpha_i K_M(x_i, x) / scale, shape (m, n_classes).

        With ``workers`` the test images are sharded over Ray workers, which receive the
        centres and coefficients once and return only the scores.
        """
        check_is_fitted(self, "alpha_")
        X = as_images(X, "X", channels=self.image_shape_[0], image_size=self.image_shape_[1:])
        return self._scores(X, [])

    def _scores(self, X, chain: list) -> np.ndarray:
        """Scores of images X after the filter banks ``chain`` ([(filters, padding), ...],
        Deep ConvRFM's feature map; applied where the images are)."""
        dev, dt, eng, budget = self._context()
        params = KernelParams(self.depth, self.patch_size, self.padding)
        Q = None if self.patch_basis_ is None else self.patch_basis_.to(dev, dt)
        M = self.M_.to(dev, dt)
        if Q is not None:
            M = Q.T @ M @ Q
        coef = self.alpha_.to(dev, torch.float64) / self.kernel_scale_
        if self.workers:
            return ray_scores(X, chain, self.X_fit_, coef, M, Q, params, eng, budget,
                              self.workers, self.address, self.gpus_per_worker, self.verbose,
                              self.placement_timeout_s)
        Z = as_tensor(X, dt, dev)
        for filters, padding in chain:
            Z = featurise(Z, torch.as_tensor(filters), padding)
        kernels = LocalKernels(self.X_fit_.to(dev, dt), params, eng, budget, self.verbose)
        kernels.set_basis(Q)
        kernels.set_metric(M)
        K = kernels.cross_kernel(Z, desc="predict kernel")
        return (K.to(torch.float64) @ coef).cpu().numpy()

    def predict(self, X) -> np.ndarray:
        """Predicted class labels, shape (m,)."""
        check_is_fitted(self, "alpha_")
        return self.classes_[self.decision_function(X).argmax(1)]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path`` (no pickle)."""
        from safetensors.torch import save_file

        check_is_fitted(self, "alpha_")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "format_version": FORMAT_VERSION,
            "model": type(self).__name__,
            "params": _jsonable(self.get_params()),
            "classes": _jsonable(self.classes_.tolist()),
            "classes_dtype": str(self.classes_.dtype),
            "ridge": self.ridge_,
            "kernel_scale": self.kernel_scale_,
            "best_iter": self.best_iter_,
            "image_shape": list(self.image_shape_),
            "history": _jsonable(self.history_),
            "center_indices": None if self.center_indices_ is None
            else [int(i) for i in self.center_indices_],
        }
        tensors = {"M": self.M_.contiguous(), "alpha": self.alpha_.contiguous(),
                   "X_fit": self.X_fit_.contiguous()}
        tensors.update({f"M_path.{t}": M.contiguous() for t, M in enumerate(self.M_path_)})
        if self.patch_basis_ is not None:
            tensors["patch_basis"] = self.patch_basis_.contiguous()
        save_file(tensors, str(path / _TENSORS))
        (path / _CONFIG).write_text(json.dumps(config, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ConvRFM:
        """Read a model written by ``save``; refuses other format versions and model types."""
        from safetensors.torch import load_file

        path = Path(path)
        config = _read_config(path, cls.__name__)
        params = dict(config["params"])
        params["ridges"] = tuple(params["ridges"])
        model = cls(**params)
        tensors = load_file(str(path / _TENSORS))
        model.M_, model.alpha_, model.X_fit_ = tensors["M"], tensors["alpha"], tensors["X_fit"]
        model.patch_basis_ = tensors.get("patch_basis")
        model.classes_ = np.asarray(config["classes"], dtype=config["classes_dtype"])
        model.ridge_ = config["ridge"]
        model.kernel_scale_ = config["kernel_scale"]
        model.best_iter_ = config["best_iter"]
        model.image_shape_ = tuple(config["image_shape"])
        model.n_features_in_ = model.M_.shape[0]
        model.history_ = config["history"]
        centres = config.get("center_indices")
        model.center_indices_ = None if centres is None else np.asarray(centres)
        model.M_path_ = [tensors[f"M_path.{t}"] for t in range(len(model.history_))]
        return model


class FitInputs(NamedTuple):
    """Checked training data: labels as indices into ``classes_``; X_mon is None without monitor."""

    X: np.ndarray | torch.Tensor
    X_fit: np.ndarray | torch.Tensor
    y_fit: np.ndarray
    X_val: np.ndarray | torch.Tensor
    y_val: np.ndarray
    X_mon: np.ndarray | torch.Tensor | None
    y_mon: np.ndarray | None


def prepare_fit_inputs(est, X, y, X_val, y_val, monitor, rng: np.random.Generator) -> FitInputs:
    """Check inputs, set ``est.classes_`` and carve the validation split (shared by estimators).

    Without X_val, ``est.val_fraction`` of (X, y) is held out, stratified when every class has
    at least two images; the split is drawn from ``rng``.
    """
    from ray_convrfm.data.parquet import ParquetImages

    if isinstance(X, ParquetImages):
        return _parquet_fit_inputs(est, X, y, X_val, y_val, monitor, rng)
    X = as_images(X, "X")
    if y is None:
        raise ValueError("y is required (only parquet.ParquetImages carry their own labels)")
    y = as_labels(y, X.shape[0], "y")
    y_idx, X_val, y_val = _classes_and_given_validation(est, y, X_val, y_val, X.shape)
    if X_val is not None:
        X_fit, y_fit = X, y_idx
    else:
        _, counts = np.unique(y_idx, return_counts=True)
        n_val = max(1, int(round(est.val_fraction * len(y_idx))))
        stratify = y_idx if counts.min() >= 2 and n_val >= len(counts) else None
        fit_idx, val_idx = train_test_split(np.arange(len(y_idx)), test_size=n_val,
                                            stratify=stratify,
                                            random_state=int(rng.integers(2**31 - 1)))
        X_fit, y_fit, X_val, y_val = X[fit_idx], y_idx[fit_idx], X[val_idx], y_idx[val_idx]
    return FitInputs(X, X_fit, y_fit, X_val, y_val, *_monitor(est, monitor, X.shape))


def _classes_and_given_validation(est, y: np.ndarray, X_val, y_val, shape: tuple[int, ...]):
    """Set ``est.classes_``; return y as class indices and the checked validation data passed
    to ``fit`` (None, None when it is to be carved from the training data)."""
    est.classes_, y_idx = np.unique(y, return_inverse=True)
    if len(est.classes_) < 2:
        raise ValueError(f"y must contain at least 2 classes; found {len(est.classes_)}")
    if (X_val is None) != (y_val is None):
        raise ValueError("pass both X_val and y_val, or neither")
    if X_val is not None:
        X_val = as_images(X_val, "X_val", channels=shape[1], image_size=shape[2:])
        y_val = encode_labels(est.classes_, as_labels(y_val, X_val.shape[0], "y_val"), "y_val")
    return y_idx, X_val, y_val


def _monitor(est, monitor, shape: tuple[int, ...]):
    if monitor is None:
        return None, None
    X_mon = as_images(monitor[0], "monitor X", channels=shape[1], image_size=shape[2:])
    y_mon = encode_labels(est.classes_, as_labels(monitor[1], X_mon.shape[0], "monitor y"),
                          "monitor y")
    return X_mon, y_mon


def _parquet_fit_inputs(est, X, y, X_val, y_val, monitor, rng: np.random.Generator):
    """Fit inputs from a parquet split: labels read here, validation rows held out in whole
    row groups and read here, the fit rows left for the workers to read (``ParquetRows``)."""
    from ray_convrfm.data.parquet import ParquetRows

    labels = X.labels()
    if y is not None:
        y = as_labels(y, len(labels), "y")
        if not np.array_equal(y, labels):
            raise ValueError("y differs from the labels stored in the parquet data set; "
                             "pass y=None to use the stored labels")
    y_idx, X_val, y_val = _classes_and_given_validation(est, labels, X_val, y_val, X.shape)
    if X_val is not None:
        fit = [(0, len(X))]
    else:
        fit, val = X.split_validation(est.val_fraction, rng)
        X_val, _ = X.read(val)
        y_val = np.concatenate([y_idx[a:b] for a, b in val])
    X_fit = ParquetRows(X, tuple(fit), dtype=str(np.dtype(est.dtype)))
    y_fit = np.concatenate([y_idx[a:b] for a, b in fit])
    return FitInputs(X, X_fit, y_fit, X_val, y_val, *_monitor(est, monitor, X.shape))


def encode_labels(classes: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    """Indices of ``y`` in ``classes``; labels never seen in training are an error."""
    pos = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
    unknown = classes[pos] != y
    if unknown.any():
        raise ValueError(f"{name} has labels not seen in y: {np.unique(y[unknown])[:10]}")
    return pos


def _training_images(X_fit, workers: int, dtype: torch.dtype, device: torch.device):
    """Training images as a tensor, except parquet rows bound for workers (read there)."""
    from ray_convrfm.data.parquet import ParquetRows

    if isinstance(X_fit, ParquetRows):
        if workers:
            return X_fit
        X_fit = X_fit.load()
    return as_tensor(X_fit, dtype, device)


def _full_metric(M: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    """The (d, d) metric Q M Q^T of a metric M given in the patch-span coordinates."""
    return M.clone() if Q is None else Q @ M @ Q.T


def _read_config(path: Path, expected_model: str) -> dict:
    cfg_file = path / _CONFIG
    if not cfg_file.exists() or not (path / _TENSORS).exists():
        raise FileNotFoundError(f"{path} is not a saved model: expected {_CONFIG} and {_TENSORS}")
    config = json.loads(cfg_file.read_text())
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} was saved in model format version {version}; this version of "
                         f"ray_convrfm reads format {FORMAT_VERSION} only")
    if config.get("model") != expected_model:
        raise ValueError(f"{path} holds a {config.get('model')} model, not a {expected_model}")
    return config


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


