"""Options, one frozen dataclass per subsystem, composed into one ``Options``.

Every estimator takes one ``options=Options(...)``; its fields are documented once, here. Build
one from flat names with ``Options.of(workers=2, dtype="float64")`` and derive variants with
``options.replace(workers=4)`` (``dataclasses.replace`` on the subsystem that owns each name).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Default working-memory budget of one kernel block. 512 MiB keeps a 2-core laptop responsive and
#: is far below a GPU's memory; raise it on big machines for fewer, larger blocks.
DEFAULT_MEMORY_BUDGET_MB = 512

#: Rows (and columns) per stored kernel block: one zarr chunk and one worker task. 256 x 256
#: float32 values are 256 KiB, large enough to amortise a task, small enough to resume finely.
DEFAULT_BLOCK = 256

#: Partial results (AGOPs, Grams, normal equations) are summed by a tree of this fan-in on the
#: workers once there are more parts than this, so the driver receives one sum, not one per worker.
REDUCE_FAN_IN = 4

#: Share of ``memory_budget_mb`` one prepared chunk of images (rows, centers or AGOP samples)
#: may take: a slab's rows and a block of centers are prepared a chunk at a time. At least one
#: image is prepared at once, so a single prepared image larger than this share is the floor.
PREPARED_SHARE = 1 / 8

#: ``agop_classes="auto"``: the exact AGOP up to this many classes, a sketch of this many
#: columns beyond (docs/math.md 4a).
AUTO_SKETCH_CLASSES = 64

#: Share of ``memory_budget_mb`` that a worker's prepared blocks of centers may keep between passes
#: (32 MiB of the default 512): every center of a small problem, a few blocks of a large one, whose
#: other blocks are prepared again for each slab of rows (about d / b of the slab's kernel).
CENTER_CACHE_SHARE = 1 / 16

#: Rows of K(train, centers) converted to float64 at a time in a CG product (64 x m x 8 bytes:
#: small enough that both products read them from cache; 20 % faster than whole slabs).
MATVEC_ROWS = 64

#: Conjugate gradient of the iterative Nystrom solver stops at this relative residual of the
#: preconditioned system: far below the noise of the validation choice, and reached in a few
#: dozen steps with Falkon's preconditioner (tests/kernels/test_pcg.py).
CG_TOLERANCE = 1e-8

#: ...or after this many steps (with a warning): a preconditioned system that needs more is
#: ill-posed for this ridge, and more steps would not help.
CG_MAX_ITERATIONS = 500

#: "exact": Cholesky of the n x n kernel; "nystrom": m centers, Falkon-preconditioned conjugate
#: gradient over resident rows of K_nm (docs/math.md 9a; nothing m x m is formed from K_nm);
#: "nystrom-direct": the m x m normal equations summed and solved by Cholesky (small m).
SOLVERS = ("exact", "nystrom", "nystrom-direct")

#: Kernel engines (``ComputeOptions.engine``); devices.resolve_engine picks one for "auto".
ENGINES = ("auto", "numba", "torch", "triton")

#: Nystrom centers when none are given: an m x m Cholesky that takes seconds.
DEFAULT_CENTERS = 2000


@dataclass(frozen=True)
class ComputeOptions:
    """How kernels and AGOPs are computed.

    Parameters
    ----------
    dtype : {None, "float32", "float64"}
        Working precision. None follows the input: float64 images compute in float64, anything
        else (float32, integers) in float32.
    device : str
        "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    engine : {"auto", "numba", "torch", "triton"}
        "numba" is the fused CPU path (one pass per image pair, in cache); "triton" the fused
        CUDA path (the ``[gpu]`` extra); "torch" the eager path that runs on any torch device.
        "auto" takes numba on the CPU, Triton on CUDA when installed, else torch.
    memory_budget_mb : int
        Working memory one block may use; block sizes are derived from it, never from n.
    threads : int or None
        CPU threads of this process's torch and numba pools (None: every CPU it may use);
        numpy's and scipy's BLAS keep one (``kernels.threads``). Ray workers take
        ``ClusterOptions.threads_per_worker`` instead.
    """

    dtype: str | None = None
    device: str = "auto"
    engine: str = "auto"
    memory_budget_mb: int = DEFAULT_MEMORY_BUDGET_MB
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype must be None, 'float32' or 'float64'; found {self.dtype!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}; found {self.engine!r}")
        if not _is_int(self.memory_budget_mb) or self.memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be a positive integer; found "
                             f"{self.memory_budget_mb!r}")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None; found "
                             f"{self.threads!r}")


@dataclass(frozen=True)
class ClusterOptions:
    """Where the work runs: this process (``workers=0``) or Ray shard workers.

    Parameters
    ----------
    workers : int
        0 computes in this process; N > 0 spreads the training images over N Ray actors.
    address : str or None
        None starts an embedded local Ray sized to ``workers`` (loopback only, no dashboard);
        "auto" or "ray://..." joins that cluster. Refused with ``workers=0`` (no effect).
    gpus_per_worker : float or None
        GPUs reserved per worker; None means 1 when the Ray cluster has GPUs, else 0.
    placement_timeout_s : float or None
        How long to wait for the cluster to provide the workers (an autoscaler starting nodes)
        before giving up with an error; None waits forever.
    threads_per_worker : int
        CPU threads (and CPUs reserved) per worker.
    max_restarts : int
        How often Ray restarts each dead worker; its tasks wait for the restart and run again
        (they are pure, so that is safe).
    recovery_timeout_s : float
        How long the work waits for a lost worker (its node gone, its restart waiting for a
        node, as an autoscaler brings one up) before it stops with ``WorkerLostError`` naming
        the node; a rerun with the same store resumes.
    """

    workers: int = 0
    address: str | None = None
    gpus_per_worker: float | None = None
    placement_timeout_s: float | None = 600
    threads_per_worker: int = 1
    max_restarts: int = 3
    recovery_timeout_s: float = 300

    def __post_init__(self) -> None:
        if not _is_int(self.workers) or self.workers < 0:
            raise ValueError(f"workers must be an integer >= 0; found {self.workers!r}")
        if self.address is not None and not self.workers:
            raise ValueError(f"address={self.address!r} has no effect with workers=0 (the work "
                             f"runs in this process); pass workers=N to run on N Ray workers "
                             f"of that cluster, or address=None")
        if self.gpus_per_worker is not None and not self.gpus_per_worker >= 0:
            raise ValueError(f"gpus_per_worker must be >= 0; found {self.gpus_per_worker!r}")
        if self.placement_timeout_s is not None and not self.placement_timeout_s > 0:
            raise ValueError(f"placement_timeout_s must be positive or None; found "
                             f"{self.placement_timeout_s!r}")
        if not _is_int(self.threads_per_worker) or self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be a positive integer; found "
                             f"{self.threads_per_worker!r}")
        if not _is_int(self.max_restarts) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an integer >= 0; found {self.max_restarts!r}")
        if not self.recovery_timeout_s > 0:
            raise ValueError(f"recovery_timeout_s must be positive; found "
                             f"{self.recovery_timeout_s!r}")


@dataclass(frozen=True)
class StoreOptions:
    """Where kernel blocks are kept so that a run survives failures and resumes.

    Parameters
    ----------
    url : str or None
        A local path or fsspec URL (``s3://bucket/run/kernels.zarr``) of a zarr store; a rerun
        with the same inputs computes only the blocks not yet stored. None keeps no store.
        (``Options.of(store=...)`` sets this field.)
    block : int
        Rows and columns per stored block (one chunk, one worker task).
    """

    url: str | None = None
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        if self.url is not None and not isinstance(self.url, str):
            object.__setattr__(self, "url", str(self.url))  # a pathlib.Path is welcome
        if not _is_int(self.block) or self.block < 1:
            raise ValueError(f"block must be a positive integer; found {self.block!r}")


@dataclass(frozen=True)
class SolveOptions:
    """How the iterative Nystrom solver (``solver="nystrom"``) holds its rows and factors.

    Parameters
    ----------
    resident_mb : int or None
        Memory per worker (or per process, in-process) for the resident rows of K(train,
        centers) between conjugate-gradient steps. Row slabs beyond it live in zarr (the run's
        kernel store, or a temporary store on the worker's disk) and are read back, checked,
        at every step. None keeps every row in memory.
    preconditioner_rank : int or None
        None factors the centers' m x m kernel (Falkon's preconditioner, 8 m^2 bytes on one
        worker); q < m builds a rank-q spectral preconditioner from q of the centers (8 m q
        bytes), for an m whose m x m factor fits nowhere.
    """

    resident_mb: int | None = None
    preconditioner_rank: int | None = None

    def __post_init__(self) -> None:
        if self.resident_mb is not None and (not _is_int(self.resident_mb)
                                             or self.resident_mb < 0):
            raise ValueError(f"resident_mb must be an integer >= 0 or None; found "
                             f"{self.resident_mb!r}")
        if self.preconditioner_rank is not None and (not _is_int(self.preconditioner_rank)
                                                     or self.preconditioner_rank < 1):
            raise ValueError(f"preconditioner_rank must be a positive integer or None; found "
                             f"{self.preconditioner_rank!r}")


@dataclass(frozen=True)
class Options:
    """Everything about how (not what) an estimator computes; the model does not depend on it.

    Parameters
    ----------
    compute, cluster, store, solve : the subsystems' options
    verbose : progress bars on long stages and one log line per iteration
    """

    compute: ComputeOptions = field(default_factory=ComputeOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    store: StoreOptions = field(default_factory=StoreOptions)
    solve: SolveOptions = field(default_factory=SolveOptions)
    verbose: bool = False

    @classmethod
    def of(cls, **flat: Any) -> Options:
        """Options from flat field names, e.g. ``Options.of(workers=2, dtype="float64")``."""
        return cls().replace(**flat)

    def replace(self, **flat: Any) -> Options:
        """A copy with the named fields of any subsystem replaced (``store`` sets the URL)."""
        changes: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for name, value in flat.items():
            if name == "verbose":
                top[name] = bool(value)
                continue
            owner = _OWNER.get("url" if name == "store" else name)
            if owner is None:
                raise TypeError(f"unknown option {name!r}; known: {sorted(_FLAT_NAMES)}")
            changes.setdefault(owner, {})["url" if name == "store" else name] = value
        parts = {k: dataclasses.replace(getattr(self, k), **v) for k, v in changes.items()}
        return dataclasses.replace(self, **parts, **top)


def _is_int(value: Any) -> bool:
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_OWNER = {f.name: part for part, sub in (("compute", ComputeOptions),
                                         ("cluster", ClusterOptions), ("store", StoreOptions),
                                         ("solve", SolveOptions))
          for f in dataclasses.fields(sub)}
_FLAT_NAMES = (set(_OWNER) - {"url"}) | {"store", "verbose"}


def as_options(options: Options | None) -> Options:
    """``options`` checked (None gives the defaults)."""
    if options is None:
        return Options()
    if not isinstance(options, Options):
        raise TypeError(f"options must be a ray_convrfm.Options (e.g. Options.of(workers=2)); "
                        f"found {type(options).__name__}")
    return options
