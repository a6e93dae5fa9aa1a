"""The RFM loop of docs/math.md section 5, written once for every estimator and backend.

``fit_rfm(backend, targets, validation, params, rng)`` alternates kernel ridge regression with
the metric M and M <- AGOP^power of that predictor, and keeps the (M, ridge) with the best
validation accuracy. ``ConvRFM`` calls it once; every ``DeepConvRFM`` layer calls it on the
layer's inputs. What differs between the exact and the Nystrom solver is one small class each
(``ExactRidge``, ``NystromRidge``); what differs between a laptop and a cluster is the backend.
"""

from __future__ import annotations

import logging
import numbers
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ray_convrfm.backends.protocol import KernelBackend, Targets
from ray_convrfm.kernels.agop import class_sketch, metric_from_agop, sketch_columns
from ray_convrfm.kernels.kernel import KernelParams
from ray_convrfm.kernels.pcg import preconditioned_cg
from ray_convrfm.kernels.solvers import (
    SingularKernelError,
    kernel_scale,
    solve_nystrom,
    solve_ridge,
)
from ray_convrfm.options import CG_MAX_ITERATIONS, CG_TOLERANCE, DEFAULT_CENTERS, SOLVERS

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RFMParams:
    """What one ConvRFM layer learns with; checked on construction (errors name the field)."""

    kernel: KernelParams = field(default_factory=KernelParams)
    iters: int = 10
    ridges: tuple[float, ...] = (1e-8, 1e-5, 1e-3)
    agop_samples: int = 256
    agop_power: float = 1.0
    metric_floor: float = 0.0
    patch_basis: str | float = "auto"
    solver: str = "exact"
    centers: int | None = None
    patience: int | None = 2
    agop_classes: str | int = "auto"

    def __post_init__(self) -> None:
        if not _positive_int(self.iters):
            raise ValueError(f"iters must be a positive integer; found {self.iters!r}")
        try:
            ridges = tuple(float(r) for r in np.atleast_1d(np.asarray(self.ridges, dtype=float)))
        except (TypeError, ValueError):
            ridges = ()
        if not ridges or np.asarray(self.ridges).ndim > 1 \
                or not all(np.isfinite(r) and r >= 0 for r in ridges):
            raise ValueError(f"ridges must be a non-empty list of finite values >= 0; found "
                             f"{self.ridges!r}")
        object.__setattr__(self, "ridges", ridges)
        object.__setattr__(self, "iters", int(self.iters))
        if not _positive_int(self.agop_samples):
            raise ValueError(f"agop_samples must be a positive integer; found "
                             f"{self.agop_samples!r}")
        object.__setattr__(self, "agop_samples", int(self.agop_samples))
        if not self.agop_power > 0:
            raise ValueError(f"agop_power must be positive; found {self.agop_power}")
        if not (isinstance(self.metric_floor, numbers.Real) and 0 <= self.metric_floor < 1):
            raise ValueError(f"metric_floor must be a number in [0, 1); found "
                             f"{self.metric_floor!r}")
        if not (self.patch_basis in ("auto", "full") or (
                isinstance(self.patch_basis, numbers.Real)
                and not isinstance(self.patch_basis, bool) and 0 < self.patch_basis < 1)):
            raise ValueError(f"patch_basis must be 'auto', 'full' or a share of the patches' "
                             f"energy in (0, 1); found {self.patch_basis!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; found {self.solver!r}")
        if not (self.agop_classes in ("auto", "all") or _positive_int(self.agop_classes)):
            raise ValueError(f"agop_classes must be 'auto', 'all' or a positive integer; found "
                             f"{self.agop_classes!r}")
        if _positive_int(self.agop_classes):
            object.__setattr__(self, "agop_classes", int(self.agop_classes))
        if self.patience is not None:
            if not _positive_int(self.patience):
                raise ValueError(f"patience must be a positive integer or None; found "
                                 f"{self.patience!r}")
            object.__setattr__(self, "patience", int(self.patience))
        if self.centers is not None:
            if not _positive_int(self.centers):
                raise ValueError(f"centers must be a positive integer; found {self.centers!r}")
            object.__setattr__(self, "centers", int(self.centers))

    def refuse_ignored(self) -> None:
        """Refuse, before a fit, parameters it would ignore (not at load: a model saved with
        them still loads)."""
        if self.centers is not None and self.solver == "exact":
            raise ValueError(f"centers={self.centers} has no effect with solver='exact' (it "
                             f"solves over every training image); pass solver='nystrom' or "
                             f"solver='nystrom-direct' with centers, or centers=None")


@dataclass(frozen=True)
class Labelled:
    """Images held by the driver (validation, monitor) with labels as class indices."""

    X: torch.Tensor
    y: np.ndarray


@dataclass
class RFMResult:
    """What ``fit_rfm`` learned: the chosen predictor and the record of every iteration."""

    M: torch.Tensor  # (d, d) in pixel-patch coordinates
    alpha: torch.Tensor  # (m, c) on the normalised kernel
    ridge: float
    kernel_scale: float
    best_iter: int
    history: list[dict]
    M_path: list[torch.Tensor]
    centers: torch.Tensor  # the images the predictor is built on
    center_indices: np.ndarray | None
    patch_basis: torch.Tensor | None
    timings: dict[str, float]


def available_memory_bytes() -> int | None:
    """Memory this machine can still give (Linux: MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ExactTooLargeError(MemoryError, ValueError):
    """The exact solver's n x n matrices do not fit this machine (a ValueError too: the
    choice of solver and n is the caller's to change; the command line reports it in a line)."""


def check_exact_fits(n: int, itemsize: int) -> None:
    """Refuse, before any kernel is computed, an exact solve this process cannot hold: the
    n x n kernel, its float64 copy and Cholesky factor, and the float64 kernel for the MSE."""
    need = n * n * (itemsize + 24)
    have = available_memory_bytes()
    if have is not None and need > have:
        raise ExactTooLargeError(
            f"solver='exact' needs about {need / 2**30:.1f} GiB for n = {n:,} training images "
            f"(the n x n kernel, its float64 Cholesky and copies); this machine has "
            f"{have / 2**30:.1f} GiB available. Use solver='nystrom' with centers=m (memory "
            "m x m), or fewer training images")


class ExactRidge:
    """(K + ridge I) alpha = Y on the full normalised training kernel (docs/math.md section 3)."""

    def __init__(self, backend: KernelBackend, targets: Targets, it: int):
        t0 = time.perf_counter()
        K = backend.train_kernel(desc=f"iter {it}: train kernel")
        self.scale = kernel_scale(K)
        self.K = K / self.scale
        self.Y = targets.one_hot(backend.device)  # n x c: the exact solver's n is small
        self.stages = {"train_kernel": time.perf_counter() - t0}

    def solve(self, ridge: float) -> torch.Tensor:
        return solve_ridge(self.K, self.Y, ridge)

    def solve_all(self, ridges: tuple[float, ...]) -> list:
        """(ridge, alpha or the SingularKernelError it raised) for every ridge, in turn."""
        out = []
        for ridge in ridges:
            try:
                out.append((ridge, self.solve(ridge)))
            except SingularKernelError as err:
                out.append((ridge, err))
        return out

    def train_mse(self, alpha: torch.Tensor) -> float:
        return float(((self.K.to(torch.float64) @ alpha - self.Y) ** 2).mean())

    def report(self) -> dict:
        """Facts of the solve to record (none for a Cholesky)."""
        return {}

    def close(self) -> None:
        """Nothing held beyond this object."""


class NystromRidge:
    """(K_nm^T K_nm + ridge K_mm) alpha = K_nm^T Y from sums over row blocks (section 9)."""

    def __init__(self, backend: KernelBackend, targets: Targets, center_idx: np.ndarray,
                 it: int):
        t0 = time.perf_counter()
        KtK, KtY, K_mm = backend.nystrom_system(center_idx, targets)
        self.scale = kernel_scale(K_mm)
        self.KtK, self.KtY = KtK / self.scale**2, KtY / self.scale
        self.K_mm = K_mm / self.scale
        self.n, self.classes = len(targets), targets.classes
        self.stages = {"normal_equations": time.perf_counter() - t0}

    def solve(self, ridge: float) -> torch.Tensor:
        return solve_nystrom(self.KtK, self.KtY, self.K_mm, ridge)

    def train_mse(self, alpha: torch.Tensor) -> float:
        """||K_nm alpha - Y||^2 / (n c) from the normal equations, without K_nm or Y
        (||Y||^2 = n for one-hot targets)."""
        sq = self.n - 2 * (alpha * self.KtY).sum() + (alpha * (self.KtK @ alpha)).sum()
        return float(sq / (self.n * self.classes))

    solve_all = ExactRidge.solve_all
    report = ExactRidge.report
    close = ExactRidge.close


class NystromPCG:
    """The same problem as ``NystromRidge`` by preconditioned CG (docs/math.md 9a): K_nm stays
    with the backend (resident rows), the preconditioner's factor where the backend built it,
    and a step moves m x c vectors only. Every ridge is solved from the same rows; iterations
    and residuals go to the iteration's record."""

    def __init__(self, backend: KernelBackend, targets: Targets, center_idx: np.ndarray,
                 it: int):
        t0 = time.perf_counter()
        self.op = backend.nystrom_operator(center_idx, targets)
        try:
            self.scale = kernel_scale(torch.tensor(self.op.scale))
        except SingularKernelError:
            self.op.release()
            raise
        self.KtY = self.op.KtY.to(torch.float64)
        self.n, self.classes = len(targets), targets.classes
        self.cg: dict[str, dict] = {"cg_iterations_by_ridge": {}, "cg_residual_by_ridge": {}}
        self.stages = {"nystrom_rows": time.perf_counter() - t0}

    def solve_all(self, ridges: tuple[float, ...]) -> list:
        """Every ridge in one CG run over R c columns (column block r is ridge r's): each step
        passes over the resident rows once for all ridges. A ridge whose coefficients come out
        non-finite gets a ``SingularKernelError`` in its place."""
        ridges = [float(r) for r in ridges]
        if not all(r >= 0 for r in ridges):
            raise ValueError(f"ridges must be >= 0; found {ridges}")
        R, c = len(ridges), self.KtY.shape[1]
        step = self.op.preconditioned_step
        res = preconditioned_cg(lambda V: self.op.hessian(V, ridges), self.KtY.repeat(1, R),
                                self.op.preconditioner(ridges), tol=CG_TOLERANCE,
                                max_iter=CG_MAX_ITERATIONS,
                                step=None if step is None else step(ridges))
        out = []
        for k, ridge in enumerate(ridges):
            cols = slice(k * c, (k + 1) * c)
            steps = int(res.column_iterations[cols].max()) if c else 0
            residual = float(res.column_residuals[cols].max()) if c else 0.0
            self.cg["cg_iterations_by_ridge"][repr(ridge)] = steps
            self.cg["cg_residual_by_ridge"][repr(ridge)] = residual
            alpha = res.x[:, cols]
            if not torch.isfinite(alpha).all():
                out.append((ridge, SingularKernelError(
                    f"ridge={ridge:g} gives non-finite coefficients; use a larger ridge")))
                continue
            if residual > CG_TOLERANCE:
                log.warning("ridge %g: conjugate gradient stopped after %d steps at relative "
                            "residual %.2g (tolerance %g)", ridge, steps, residual,
                            CG_TOLERANCE)
            out.append((ridge, alpha))
        self.cg["cg_steps"] = res.iterations
        return out

    def train_mse(self, alpha: torch.Tensor) -> float:
        sq = self.n - 2 * (alpha * self.KtY).sum() + (alpha * self.op.hessian(alpha, [0.0])).sum()
        return float(sq / (self.n * self.classes))

    def report(self) -> dict:
        """CG iterations and final residual of every ridge."""
        return self.cg

    def close(self) -> None:
        """The backend drops the resident rows of K_nm."""
        self.op.release()


def _ridge_problem(backend: KernelBackend, targets: Targets, center_idx: np.ndarray | None,
                   solver: str, it: int):
    if center_idx is None:
        return ExactRidge(backend, targets, it)
    if solver == "nystrom-direct":
        return NystromRidge(backend, targets, center_idx, it)
    return NystromPCG(backend, targets, center_idx, it)


def fit_rfm(backend: KernelBackend, y_fit: np.ndarray, n_classes: int,
            validation: Labelled | str, params: RFMParams, rng: np.random.Generator, *,
            monitor: Labelled | str | None = None, verbose: bool = False) -> RFMResult:
    """Learn M on the training images held by ``backend`` (docs/math.md section 5).

    Parameters
    ----------
    backend : holds the n training images, already ``configure``d with the kernel's spec
    y_fit : (n,) class indices of the training images
    n_classes : c, the number of one-hot target columns
    validation : images and class indices that choose the ridge and the iteration, or the
        name of a held-out set already given to the backend (``backend.holdout``): the
        backend keeps them where it computes, and only scores per ridge come back
    params : the loop's hyper-parameters
    rng : draws the AGOP sample and the Nystrom centers
    monitor : optional images (or a held-out set's name) evaluated at every iteration for
        reporting only
    """
    n = backend.n
    dev, dt = backend.device, backend.dtype
    if isinstance(validation, Labelled):
        backend.holdout("validation", validation.X, validation.y)
        validation = "validation"
    if isinstance(monitor, Labelled):
        backend.holdout("monitor", monitor.X, monitor.y)
        monitor = "monitor"
    # class indices only: one-hot targets are made where the kernel's rows are, per slab
    targets = Targets(np.asarray(y_fit, dtype=np.int64), int(n_classes))
    sample_idx = np.sort(rng.choice(n, size=min(params.agop_samples, n), replace=False))
    center_idx = None
    if params.solver != "exact":
        m = min(n, params.centers or DEFAULT_CENTERS)
        center_idx = np.sort(rng.choice(n, size=m, replace=False))
    # the class sketch's own stream, drawn last: the sample and centers are as without it
    sketch_rng = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
    d = int(backend.row_shape[0]) * params.kernel.patch_size**2
    energy = None if isinstance(params.patch_basis, str) else float(params.patch_basis)
    Q = None if params.patch_basis == "full" else backend.patch_span(energy)
    if Q is not None:
        log.info("training patches span %d of %d dimensions%s: working in that basis",
                 Q.shape[1], d, "" if energy is None else f" (holding {energy:g} of their "
                                                         f"energy)")
        Q = Q.to(dev, dt)
    if center_idx is None:
        check_exact_fits(n, torch.empty(0, dtype=dt).element_size())
    M = torch.eye(d if Q is None else Q.shape[1], dtype=dt, device=dev)  # Q^T I Q = I_r
    history: list[dict] = []
    M_path: list[torch.Tensor] = []
    best = None
    for it in range(params.iters):
        M_path.append(_full_metric(M, Q).cpu())
        backend.set_metric(M, Q)
        t0 = time.perf_counter()
        problem = _ridge_problem(backend, targets, center_idx, params.solver, it)
        t_kernel = time.perf_counter() - t0

        t0 = time.perf_counter()
        try:
            record, (ridge, score, alpha) = _choose_ridge(problem, backend, validation,
                                                          center_idx, params.ridges, it)
            val_acc = score.acc
            train_mse = problem.train_mse(alpha)
            record.update(problem.report())
        finally:
            problem.close()
        record.update(ridge=ridge, val_acc=val_acc, val_loss=score.loss, train_mse=train_mse,
                      seconds_kernel=t_kernel, seconds_solve=time.perf_counter() - t0,
                      **{f"seconds_{k}": v for k, v in problem.stages.items()})
        scale = problem.scale
        if monitor is not None:  # timed apart: a fit without a monitor does not pay it
            t0 = time.perf_counter()
            counts = backend.evaluate(monitor, [(alpha / scale).to(dt)], center_idx)[0]
            record["monitor_acc"] = float(counts[0] / counts[2])
            record["seconds_monitor"] = time.perf_counter() - t0
        if best is None or score.beats(best["score"]):
            best = {"score": score, "iter": it, "M": M.clone(), "alpha": alpha,
                    "ridge": ridge, "scale": scale}
        del problem  # free the n x n kernel before the AGOP
        stop = stops_early(it, best["iter"], params.patience)

        t0 = time.perf_counter()
        if it < params.iters - 1 and not stop:
            coef = alpha / scale
            k = sketch_columns(n_classes, params.agop_classes)
            if k is not None:  # k Gaussian combinations of the class outputs (section 4a)
                omega = class_sketch(n_classes, k, sketch_rng)
                coef = coef @ omega.to(coef.device)
                record["agop_classes"] = k
            G = backend.agop(coef.to(dt), sample_idx, center_idx)
            M = metric_from_agop(G, params.agop_power, params.metric_floor)
        record["seconds_agop"] = time.perf_counter() - t0
        record.update(backend.report())
        history.append(record)
        if verbose:
            mon = record.get("monitor_acc")
            log.info("iter %d  ridge %g  val acc %.4f%s  train mse %.3g  kernel %.1fs  "
                     "solve %.1fs  AGOP %.1fs", it, ridge, val_acc,
                     "" if mon is None else f"  monitor acc {mon:.4f}", train_mse, t_kernel,
                     record["seconds_solve"], record["seconds_agop"])
        if stop:
            log.info("no better validation score for %d iterations: stopping after iteration "
                     "%d (best: %d)", params.patience, it, best["iter"])
            break
    return RFMResult(M=_full_metric(best["M"], Q).cpu(), alpha=best["alpha"].cpu(),
                     ridge=best["ridge"], kernel_scale=best["scale"], best_iter=best["iter"],
                     history=history, M_path=M_path, centers=backend.centers(center_idx).cpu(),
                     center_indices=center_idx, patch_basis=None if Q is None else Q.cpu(),
                     timings=backend.timings())


@dataclass(frozen=True)
class Score:
    """A validation score: higher accuracy wins, and equal accuracies (common with a few hundred
    validation images) go to the lower squared error on the one-hot targets."""

    acc: float
    loss: float

    def beats(self, other: Score | None) -> bool:
        return (other is None or self.acc > other.acc
                or (self.acc == other.acc and self.loss < other.loss))


def stops_early(it: int, best_iter: int, patience: int | None) -> bool:
    """Whether iteration ``it`` is the last: ``patience`` iterations without a better score."""
    return patience is not None and it - best_iter >= patience


def _choose_ridge(problem, backend: KernelBackend, validation: str,
                  center_idx: np.ndarray | None, ridges: tuple[float, ...], it: int):
    """Solve for every ridge, then score them all in one pass over the validation images
    (where the backend keeps them); the best ``Score`` wins (the first on exact ties)."""
    record = {"iter": it, "val_acc_by_ridge": {}, "val_loss_by_ridge": {}, "failed_ridges": []}
    solved = []
    for ridge, alpha in problem.solve_all(ridges):
        if isinstance(alpha, SingularKernelError):
            record["failed_ridges"].append(ridge)
            log.info("iteration %d: %s", it, alpha)
        else:
            solved.append((ridge, alpha))
    if not solved:
        raise SingularKernelError(f"iteration {it}: every ridge in {ridges} failed; pass "
                                  "larger ridges")
    t0 = time.perf_counter()
    counts = backend.evaluate(validation, [(a / problem.scale).to(backend.dtype)
                                           for _, a in solved], center_idx)
    record["seconds_validation"] = time.perf_counter() - t0
    chosen = None
    for (ridge, alpha), (correct, sq, count) in zip(solved, counts, strict=True):
        score = Score(acc=float(correct / count), loss=float(sq / count))
        record["val_acc_by_ridge"][repr(ridge)] = score.acc
        record["val_loss_by_ridge"][repr(ridge)] = score.loss
        if chosen is None or score.beats(chosen[1]):
            chosen = (ridge, score, alpha)
    return record, chosen


def _full_metric(M: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    """The (d, d) metric Q M Q^T of a metric M given in the patch-span coordinates."""
    return M.clone() if Q is None else Q @ M @ Q.T


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
