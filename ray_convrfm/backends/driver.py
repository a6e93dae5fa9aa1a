"""The driver: starts or joins Ray, places one shard worker per bundle, reduces small results.

The driver holds no training images after handing the shards out: columns of a kernel (the
training images themselves, the Nystrom centers, the AGOP's predictor) travel from the workers
that own them to the workers that need them through Ray's object store, and only kernel rows
for the exact solver, m x m sums and (d, d) AGOPs come back.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
import uuid
from pathlib import Path

import numpy as np

from ray_convrfm.backends.protocol import KernelSpec
from ray_convrfm.backends.store import StoreSpec
from ray_convrfm.backends.workers import ShardWorker
from ray_convrfm.options import DEFAULT_BLOCK, REDUCE_FAN_IN
from ray_convrfm.progress import progress_bar

log = logging.getLogger(__name__)


class ShardParts(list):
    """Object refs of the workers' images (``ShardedImages.parts``), with a key naming the
    selection, so that workers recognise columns they have already prepared."""

    key: str = ""


class PlacementTimeoutError(TimeoutError):
    """The cluster did not provide the requested workers within the timeout."""


#: Settings of the embedded Ray (environment variables every process of it inherits):
#: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps its node address on loopback (Ray otherwise
#: swaps 127.0.0.1 for the machine's address), and with that address every gRPC server of it
#: (GCS, raylet, workers, this driver) and its agents bind 127.0.0.1; ``RAY_AUTH_MODE=token``
#: turns token authentication on whatever this process's environment or Ray's default says.
EMBEDDED_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


class RayConfinementError(RuntimeError):
    """The embedded Ray could not be confined to loopback with authentication on."""


def _is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (gRPC's dual-stack sockets)."""
    import ipaddress

    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def embedded_ray_processes() -> list:
    """The processes of the embedded Ray this process runs (``psutil.Process``): the head's
    own (GCS, raylet, log monitor, autoscaler monitor, ...) and every process they started
    (the raylet's agents and workers). This driver is not among them."""
    import psutil  # Ray's dependency (vendored by Ray: importable once ray is)
    import ray

    node = ray._private.worker._global_node
    if node is None:
        return []
    found: dict[int, psutil.Process] = {}
    for infos in node.all_processes.values():
        for info in infos:
            try:
                p = psutil.Process(info.process.pid)
                for q in [p, *p.children(recursive=True)]:
                    found.setdefault(q.pid, q)
            except psutil.NoSuchProcess:
                continue
    return list(found.values())


def listening_sockets(processes) -> list[tuple[int, str, str, int]]:
    """``(pid, process name, address, port)`` of every listening TCP socket and bound UDP
    socket of ``processes`` (``psutil.Process``) that are still alive."""
    import psutil

    out = []
    for p in processes:
        try:
            name = p.name()
            conns = (p.net_connections if hasattr(p, "net_connections")
                     else p.connections)(kind="inet")  # psutil < 6
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for c in conns:
            listening = (c.status == psutil.CONN_LISTEN if c.type == socket.SOCK_STREAM
                         else not c.raddr)
            if listening and c.laddr:
                out.append((p.pid, name, c.laddr.ip, c.laddr.port))
    return out


@contextlib.contextmanager
def _embedded_settings():
    """``EMBEDDED_RAY_ENV`` in the environment while ``ray.init`` starts the embedded Ray's
    processes (they keep it; this process gets its own values back), and Ray's copy of its
    cluster flag for this process, whose address Ray resolves here."""
    from ray._private import ray_constants

    old_env = {k: os.environ.get(k) for k in EMBEDDED_RAY_ENV}
    old_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(EMBEDDED_RAY_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        _reload_ray_auth()
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reload_ray_auth() -> None:
    """Make Ray in this process re-read ``RAY_AUTH_MODE`` and its token from the environment
    (it caches both): before starting the embedded Ray, and before joining a cluster, so that
    neither inherits the other's authentication settings."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication: nothing cached
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _check_token_file() -> None:
    """The token the embedded Ray uses, where Ray looks for it (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``): created private (mode 600) when
    missing, and a warning when another user of this machine can read it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it just now
            return
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))  # as Ray's own generator: 256 random bits
    elif path.stat().st_mode & 0o077:
        log.warning("the embedded Ray's authentication token %s can be read by other users "
                    "of this machine (mode %o): run chmod 600 %s", path,
                    path.stat().st_mode & 0o777, path)


def _start_embedded_ray(workers: int) -> None:
    """An embedded Ray confined to this machine: every listener on 127.0.0.1, token
    authentication on, no dashboard process; or ``RayConfinementError`` (and no Ray)."""
    import ray

    try:
        import psutil
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError as err:
        raise RayConfinementError(
            f"this Ray ({ray.__version__}) has no token authentication ({err}); the embedded "
            "Ray needs it: upgrade Ray, or join a cluster you secured with --address") from err
    _check_token_file()
    me = psutil.Process()
    before = set(listening_sockets([me]))
    with _embedded_settings():
        ray.init(address="local", num_cpus=max(1, workers), include_dashboard=False,
                 dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    try:
        node = ray._private.worker._global_node
        # Ray 2.60 starts its API server ("dashboard" process) even without a dashboard; with
        # include_dashboard=False it serves nothing the embedded Ray uses
        node.kill_dashboard(check_alive=False)
        problems = [f"its node address is {node.node_ip_address}, not 127.0.0.1"
                    ] if node.node_ip_address != "127.0.0.1" else []
        if get_authentication_mode() != AuthenticationMode.TOKEN:
            problems.append("token authentication is off")
        driver = [s for s in listening_sockets([me]) if s not in before]
        problems += [f"{name} (pid {pid}) listens on {ip}:{port}" for pid, name, ip, port
                     in driver + listening_sockets(embedded_ray_processes())
                     if not _is_loopback(ip)]
        if problems:
            raise RayConfinementError(
                f"the embedded Ray {ray.__version__} could not be confined to this machine: "
                f"{'; '.join(problems)}. Refusing to run on it; join a cluster you secured "
                "with --address (Options.of(address=...)) instead")
    except BaseException:
        ray.shutdown()
        raise


def start_ray(workers: int, address: str | None = None) -> None:
    """Join ``address`` ("auto", "ray://...", "host:port") or start an embedded local Ray for
    ``workers``; nothing when Ray is already initialised in this process.

    The embedded Ray is for this machine only: every process of it listens on 127.0.0.1 alone
    (checked after it starts: ``RayConfinementError`` and no Ray otherwise), token
    authentication is on (``RAY_AUTH_MODE=token`` with Ray's token: ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, created with mode 600 when missing), and
    no dashboard runs (Ray's dashboard agent process stays: its raylet requires it; it
    listens on 127.0.0.1 too). Joining a cluster uses this process's own Ray settings and
    that cluster's security.
    """
    import ray

    if ray.is_initialized():
        return
    if address is None or address == "local":  # Ray's "local" starts one too: the same one
        _start_embedded_ray(workers)
    else:
        _reload_ray_auth()  # this process's own settings, not an embedded Ray's
        ray.init(address=address, log_to_driver=False)


def resolve_gpus_per_worker(gpus_per_worker: float | None) -> float:
    """None means 1 when the Ray cluster has GPUs (now, or as autoscaler node types), else 0."""
    import ray

    if gpus_per_worker is not None:
        if gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0; found {gpus_per_worker}")
        return float(gpus_per_worker)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def reserve_workers(workers: int, bundle: dict, timeout_s: float | None, poll_s: float = 10.0,
                    elastic: bool = True):
    """A placement group of ``workers`` bundles (SPREAD over nodes), waited for.

    On an autoscaling cluster the pending group is what makes the autoscaler start nodes; while
    waiting this logs what it waits for and what the cluster has, and after ``timeout_s``
    (None: wait forever) it removes the group and raises ``PlacementTimeoutError``. A cluster
    that cannot grow (``elastic=False``: the embedded local Ray) is refused at once when its
    total resources are too small.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    total = ray.cluster_resources()
    short = {k: v * workers for k, v in bundle.items() if v * workers > total.get(k, 0)}
    if short and not elastic:
        raise PlacementTimeoutError(
            f"{workers} workers of {bundle} need {short}, but this local Ray has "
            f"{ {k: total.get(k, 0) for k in short} } in all; lower --workers / "
            "--gpus-per-worker, or join a larger cluster with --address")

    pg = placement_group([dict(bundle)] * workers, strategy="SPREAD")
    start = time.monotonic()
    while True:
        ready, _ = ray.wait([pg.ready()], timeout=poll_s if timeout_s is None
                            else max(0.0, min(poll_s, timeout_s - (time.monotonic() - start))))
        if ready:
            return pg
        waited = time.monotonic() - start
        have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        if timeout_s is not None and waited >= timeout_s:
            remove_placement_group(pg)
            raise PlacementTimeoutError(
                f"gave up after {waited:.0f} s waiting for {workers} workers of {bundle}; the "
                f"cluster has {have} available. Add nodes (or let the autoscaler), lower "
                "--workers / --gpus-per-worker, or raise the placement timeout.")
        log.warning("waiting %.0f s so far for %d workers of %s; cluster has %s available",
                    waited, workers, bundle, have)


def wait_all(futures: list, desc: str = "", progress: bool = False) -> list:
    """``ray.get`` with one progress bar over every worker's tasks (results in order)."""
    import ray

    if not progress:
        return ray.get(futures)
    pending = list(futures)
    with progress_bar(len(futures), desc, True) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    return ray.get(futures)


class ShardedImages:
    """Images split into contiguous shards, one per Ray actor, each shard ``ray.put`` once.

    Parameters
    ----------
    X : (n, C, H, W) images, already in the working dtype, or a description of rows each
        worker loads itself (``parquet.ParquetRows``: images never pass through the driver)
    workers : number of actors (shards)
    threads : CPU threads per actor (None: 1 CPU reserved, the libraries' default threads)
    block : rows per task (and per stored kernel block)
    align : shard boundaries fall on multiples of ``block``, so that every block of a stored
        kernel belongs to exactly one worker (needed with a store)
    gpus_per_worker : GPUs reserved per actor (its shard and kernels then live on its GPU)
    placement_timeout_s : give up waiting for the workers' resources after this long
    elastic : whether the cluster can grow (an autoscaler); if not, resources it does not
        have at all are refused at once
    progress : one progress bar per stage across all workers
    """

    def __init__(self, X: np.ndarray, workers: int, threads: int | None = None,
                 max_restarts: int = 3, block: int = DEFAULT_BLOCK, align: bool = False,
                 gpus_per_worker: float = 0,
                 placement_timeout_s: float | None = 600, progress: bool = False,
                 elastic: bool = True):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if workers < 1:
            raise ValueError(f"workers must be at least 1; found {workers}")
        if hasattr(X, "load"):  # rows of a parquet data set: each worker reads its own
            self.n, self.row_shape, self.dtype = len(X), tuple(X.row_shape), np.dtype(X.dtype)
        else:
            X = np.asarray(X)
            self.n, self.row_shape, self.dtype = len(X), tuple(X.shape[1:]), X.dtype
        self.block, self.align, self.progress = block, align, progress
        bounds = np.linspace(0, self.n, workers + 1).astype(int)
        if align:
            bounds = np.minimum(np.round(bounds / block).astype(int) * block, self.n)
            bounds[-1] = self.n
        self.bounds = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        bundle = {"CPU": float(threads or 1)}
        if gpus_per_worker:
            bundle["GPU"] = float(gpus_per_worker)
        self.actors: list = []
        self.pg = reserve_workers(workers, bundle, placement_timeout_s, elastic=elastic)
        actor = ray.remote(max_restarts=max_restarts, max_task_retries=max_restarts)(ShardWorker)
        # the refs stay referenced here: a restarted actor is rebuilt from them
        self.shard_refs = [ray.put(X.slice(a, b) if hasattr(X, "load") else X[a:b])
                           for a, b in self.bounds]
        self.actors = [
            actor.options(num_cpus=threads or 1, num_gpus=gpus_per_worker or 0,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              self.pg, placement_group_bundle_index=k)
                          ).remote(ref, a, threads, gpus_per_worker)
            for k, (ref, (a, b)) in enumerate(zip(self.shard_refs, self.bounds, strict=True))]
        self.chain: list = []
        self.chain_ref = ray.put(self.chain)
        #: seconds spent per stage (driver wall time): for benchmarks and the cost model
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:  # the workers load their shards (parquet rows are read and decoded there)
            wait_all([a.size.remote() for a in self.actors], "load shards", progress)
        except BaseException:
            self.close()  # e.g. an unreadable row group: release the workers and reservation
            raise
        self._time("load", t0)

    def _time(self, stage: str, t0: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ the images
    def featurise(self, filters: np.ndarray, padding: bool) -> None:
        """Every worker convolves its own shard with ``filters`` (Deep ConvRFM's next inputs);
        the images never pass through the driver."""
        import ray

        self.chain = [*self.chain, (np.asarray(filters), bool(padding))]
        self.chain_ref = ray.put(self.chain)
        shapes = wait_all([a.prepare.remote(self.chain_ref) for a in self.actors],
                          "featurise", self.progress)
        self.row_shape = tuple(next(s for s in shapes if s[0])[1:]) if self.n else ()

    def _local(self, idx: np.ndarray | None):
        """Per shard, the local rows of sorted global indices ``idx`` (None: all rows)."""
        if idx is None:
            return [None] * len(self.bounds)
        idx = np.asarray(idx)
        if np.any(np.diff(idx) < 0):
            raise ValueError("row indices must be sorted")
        return [idx[(idx >= a) & (idx < b)] - a for a, b in self.bounds]

    def parts(self, idx: np.ndarray | None = None) -> list:
        """Object refs of the shards' images (rows ``idx`` when given), in global order; they
        stay on the workers' nodes until a task that needs them runs."""
        refs = ShardParts(a.images.remote(self.chain_ref, rows)
                          for a, rows in zip(self.actors, self._local(idx), strict=True)
                          if rows is None or len(rows))
        # the same selection of the same (featurised) images gets the same key, so workers
        # keep one prepared copy of it across stages (kernel, validation, AGOP)
        selection = "all" if idx is None else hashlib.sha256(
            np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()
        refs.key = f"parts:{self.chain_ref.hex()}:{selection}"
        return refs

    def gather(self, idx: np.ndarray | None = None) -> np.ndarray:
        """The images (rows ``idx``) in this process: for the model's centers only."""
        import ray

        parts = ray.get(self.parts(idx))
        if not parts:
            return np.zeros((0, *self.row_shape), dtype=self.dtype)
        return np.concatenate(parts, axis=0)

    def fingerprint(self) -> str:
        """Fingerprint of the (featurised) images, equal to ``store.rows_fingerprint``."""
        import ray

        if not self.align:
            raise ValueError("fingerprints need block-aligned shards (align=True)")
        from ray_convrfm.backends.store import combine_digests

        digests = ray.get([a.digests.remote(self.chain_ref, self.block) for a in self.actors])
        return combine_digests([d for part in digests for d in part], self.row_shape,
                               np.dtype(self.dtype).str)

    def patch_gram(self, patch_size: int, padding: bool) -> np.ndarray:
        """Sum over every patch of every shard of p p^T (float64, (d, d))."""
        return self.reduce([a.patch_gram.remote(self.chain_ref, patch_size, padding)
                            for a in self.actors])

    # ------------------------------------------------------------------ reductions
    def reduce(self, refs: list, fan_in: int = REDUCE_FAN_IN):
        """Sum of partial results; with many parts, a tree of sums computed on the workers
        (so the driver receives one result, not one per worker)."""
        import ray

        level = 0
        while len(refs) > fan_in:
            groups = [refs[k : k + fan_in] for k in range(0, len(refs), fan_in)]
            refs = [self.actors[(g * fan_in + level) % len(self.actors)].add.remote(*group)
                    for g, group in enumerate(groups)]
            level += 1
        parts = ray.get(refs)
        return sum(parts[1:], parts[0])

    # ------------------------------------------------------------------ kernels
    def _columns(self, cols) -> tuple[str, list]:
        """(key, refs) of kernel columns: an array is put once; a list of refs is used as is."""
        import ray

        if isinstance(cols, ShardParts):
            return cols.key, list(cols)
        if isinstance(cols, list):
            return "-".join(r.hex() for r in cols), cols
        return uuid.uuid4().hex, [ray.put(np.asarray(cols))]

    def _row_tasks(self):
        """(actor, local r0, r1) for every block of rows, shard by shard."""
        for actor, (a, b) in zip(self.actors, self.bounds, strict=True):
            for r in range(a, b, self.block):
                yield actor, r - a, min(r + self.block, b) - a

    def kernel(self, cols, M: np.ndarray, basis: np.ndarray | None, spec: KernelSpec,
               desc: str = "kernel") -> np.ndarray:
        """K(all shards, cols) with ``cols`` an array or a list of refs (e.g. ``parts()``)."""
        key, refs = self._columns(cols)
        futures = [actor.kernel_rows.remote(self.chain_ref, r0, r1, M, basis, spec, key, *refs)
                   for actor, r0, r1 in self._row_tasks()]
        rows = wait_all(futures, desc, self.progress)
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, 0), np.float32)

    def kernel_via_store(self, cols, n_cols: int, M: np.ndarray, basis: np.ndarray | None,
                         spec: KernelSpec, url: str, store_spec: StoreSpec, name: str,
                         desc: str = "kernel") -> tuple[np.ndarray, int]:
        """K(all shards, cols) through a zarr store: workers write the missing blocks.

        Returns the kernel, read back from the store (each block checked against its digest),
        and how many blocks were computed now, damaged ones recomputed included (0 when a
        previous run already stored them all intact).
        """
        from ray_convrfm.backends.store import KernelStore

        if not self.align:
            raise ValueError("a stored kernel needs block-aligned shards (align=True)")
        shape = (self.n, n_cols)
        store = KernelStore(url, store_spec)
        missing = store.missing(name, shape)  # creates the arrays before workers write
        key, refs = self._columns(cols)

        def compute(blocks: list[tuple[int, int]]) -> int:
            """The workers owning ``blocks``' rows write those not marked; how many."""
            futures = []
            for actor, (a, b) in zip(self.actors, self.bounds, strict=True):
                for i in range(a // self.block, -(-b // self.block)):
                    row = [(bi, bj) for bi, bj in blocks if bi == i]
                    if row:
                        futures.append(actor.store_kernel_blocks.remote(
                            self.chain_ref, row, url, store_spec, name, shape, M, basis, spec,
                            key, *refs))
            return int(sum(wait_all(futures, desc, self.progress)))

        computed = [compute(missing)]
        # every block is checked against its digest as it is read; damaged ones are recomputed
        K = store.read(name, shape, recompute=lambda blocks: computed.append(compute(blocks)))
        return K, sum(computed)

    def map_kernel(self, rows: np.ndarray, cols, M: np.ndarray, basis: np.ndarray | None,
                   spec: KernelSpec, desc: str = "kernel") -> np.ndarray:
        """K(rows, cols) for images not held by the workers: blocks of rows over the actors."""
        key, refs = self._columns(cols)
        rows = np.asarray(rows)
        futures = [self.actors[k % len(self.actors)].kernel_pair.remote(
                       rows[r : r + self.block], M, basis, spec, key, *refs)
                   for k, r in enumerate(range(0, len(rows), self.block))]
        return np.concatenate(wait_all(futures, desc, self.progress), axis=0)

    def map_scores(self, rows: np.ndarray, chain: list, centers, alpha: np.ndarray,
                   M: np.ndarray, basis: np.ndarray | None, spec: KernelSpec,
                   desc: str = "predict") -> np.ndarray:
        """K(chain(rows), centers) @ alpha for images the driver sends, in blocks over the
        actors: each block is featurised and scored where it lands; only scores return."""
        import ray

        key, refs = self._columns(centers)
        alpha = np.asarray(alpha)
        alpha_ref, chain_ref = ray.put(alpha), ray.put(list(chain))
        rows = np.asarray(rows)
        futures = [self.actors[k % len(self.actors)].scores.remote(
                       rows[r : r + self.block], chain_ref, alpha_ref, M, basis, spec, key,
                       *refs)
                   for k, r in enumerate(range(0, len(rows), self.block))]
        t0 = time.perf_counter()
        parts = wait_all(futures, desc, self.progress)
        self._time("scores", t0)
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, alpha.shape[1]))

    def nystrom_system(self, centers, center_idx: np.ndarray, Y: np.ndarray, M: np.ndarray,
                       basis: np.ndarray | None, spec: KernelSpec, store: tuple | None = None):
        """Sum of per-shard (K^T K, K^T Y), K_mm assembled from the shards' center rows, and
        the blocks computed; with ``store`` = (url, store spec) K(train, centers) is stored."""
        import ray

        key, refs = self._columns(centers)
        mine = self._local(center_idx)
        stored = None
        if store is not None:
            from ray_convrfm.backends.store import KernelStore

            if not self.align:
                raise ValueError("a stored kernel needs block-aligned shards (align=True)")
            url, store_spec = store
            shape = (self.n, len(center_idx))
            KernelStore(url, store_spec).kernel("K", shape)  # created before the workers write
            stored = (url, store_spec, "K", shape)
        futures = [actor.normal_equations_part.options(num_returns=5).remote(
                       self.chain_ref, Y[a:b], rows, M, basis, spec, self.block, stored, key,
                       *refs)
                   for actor, (a, b), rows in zip(self.actors, self.bounds, mine, strict=True)]
        t0 = time.perf_counter()
        wait_all([f[0] for f in futures], "Nystrom normal equations", self.progress)
        self._time("normal_equations_compute", t0)
        t0 = time.perf_counter()
        KtK = self.reduce([f[0] for f in futures])
        KtY = self.reduce([f[1] for f in futures])
        self._time("normal_equations_reduce", t0)
        K_mm = np.concatenate(ray.get([f[2] for f in futures]), axis=0)  # sorted center order
        for reports in ray.get([f[4] for f in futures]):  # damaged blocks the workers redid
            for message in reports:
                log.warning("%s (on a shard worker)", message)
        return KtK, KtY, K_mm, int(sum(ray.get([f[3] for f in futures])))

    def agop(self, train, coef: np.ndarray, sample_idx: np.ndarray, M: np.ndarray,
             basis: np.ndarray | None, spec: KernelSpec) -> np.ndarray:
        """Patch AGOP averaged over sorted ``sample_idx`` (global rows): per-shard sums of the
        predictor f = coef^T K(train, .), reduced here; ``train`` as in ``kernel``."""
        import ray

        key, refs = self._columns(train)
        coef_ref = ray.put(np.asarray(coef))
        futures = [actor.agop_part.remote(self.chain_ref, rows, coef_ref, M, basis, spec, key,
                                          *refs)
                   for actor, rows in zip(self.actors, self._local(sample_idx), strict=True)]
        t0 = time.perf_counter()
        wait_all(futures, "AGOP", self.progress)
        self._time("agop", t0)
        return self.reduce(futures) / len(sample_idx)

    def peak_rss_mb(self) -> list[float]:
        """Every worker's peak resident memory so far (MiB)."""
        import ray

        return ray.get([a.peak_rss_mb.remote() for a in self.actors])

    def nodes(self) -> list[str]:
        """The Ray node of every worker (to check that work spread over nodes)."""
        import ray

        return ray.get([a.node.remote() for a in self.actors])

    def __enter__(self) -> ShardedImages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors (their shards go with them) and release their reservation."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.shard_refs = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

