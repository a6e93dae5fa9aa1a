"""The lease a fit holds on its kernel store, so that two runs never write one store at once.

On a local path the lease is an OS file lock (``flock``) on ``<store>/run.lease``: the kernel
drops it when the holder dies, however it dies, so a killed fit never blocks the next. On an
fsspec URL (``s3://``...) it is an object created only if absent, refreshed by a heartbeat, and
taken over when its holder is a dead process on this host or has been silent for
``LEASE_TTL_S``: best effort, as object stores offer no locks.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

try:
    import fcntl as _flock
except ImportError:  # no flock (Windows): local paths use the lease object too
    _flock = None

from ray_convrfm.backends.store_errors import store_io

log = logging.getLogger(__name__)

#: The lease file (local paths) or object (fsspec URLs) at the root of a run's store.
LEASE_NAME = "run.lease"

#: An fsspec lease whose heartbeat is older than this is taken over (its holder is gone).
LEASE_TTL_S = 600.0


class StoreBusyError(OSError):
    """Another live run holds the store's lease: two fits never write one store at once (an
    ``OSError``, like any other store that cannot be used as asked)."""


def _local_path(url: str) -> str | None:
    """The local path of a store URL (``file://`` stripped), None for other fsspec URLs."""
    url = str(url)
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _holder(token: str) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now)),
            "heartbeat": now}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _busy(url: str, holder: dict | None) -> StoreBusyError:
    who = ("holder not recorded yet" if not holder else
           f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}")
    return StoreBusyError(
        f"kernel store {url} is in use by another run ({who}). A store serves one fit at a "
        "time: wait for that run to finish, or use another store path.")


class StoreLease:
    """One run's exclusive use of a store, held from ``acquire`` to ``release``.

    On a local path it is an ``flock`` on ``<store>/run.lease``: the operating system drops it
    when its holder dies however it dies, so a crashed run never blocks the next one, and the
    file names the holder (host, pid, start) for the refusal message. On an fsspec URL it is a
    lease object created if absent, refreshed by a heartbeat; one whose holder is a dead process
    on this host or whose heartbeat is older than ``ttl_s`` is taken over (object stores give
    weaker guarantees than local files: two takers racing can both believe they won, although
    block digests still keep either from using the other's half-written blocks).
    """

    def __init__(self, url: str, path: str, token: str, fd: int | None = None, fs=None):
        self.url, self.path, self.token, self.fd, self.fs = url, path, token, fd, fs
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @classmethod
    def acquire(cls, url: str, wait_s: float = 0.0, ttl_s: float = LEASE_TTL_S,
                poll_s: float = 0.5) -> StoreLease:
        """Take the store's lease, waiting up to ``wait_s`` for a holder to finish; then
        ``StoreBusyError`` naming the store and the holder."""
        deadline = time.monotonic() + wait_s
        while True:
            try:  # a store that cannot be written: an OSError naming it (StoreBusyError as is)
                with store_io(str(url), "taking the kernel store's lease"):
                    local = _local_path(url)
                    if local is not None and _flock is not None:
                        return cls._acquire_local(str(url), local)
                    return cls._acquire_fsspec(str(url), ttl_s)
            except StoreBusyError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(poll_s)

    @classmethod
    def _acquire_local(cls, url: str, root: str) -> StoreLease:
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, LEASE_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        try:
            _flock.flock(fd, _flock.LOCK_EX | _flock.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(url, _read_local_holder(path)) from None
        token = uuid.uuid4().hex
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(token)).encode(), 0)
        return cls(url, path, token, fd=fd)

    @classmethod
    def _acquire_fsspec(cls, url: str, ttl_s: float) -> StoreLease:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        path = f"{root.rstrip('/')}/{LEASE_NAME}"
        fs.makedirs(root, exist_ok=True)
        held = _read_fs_holder(fs, path)
        if held is not None:
            stale = (time.time() - float(held.get("heartbeat", 0)) > ttl_s
                     or (held.get("host") == socket.gethostname()
                         and not _pid_alive(int(held.get("pid", -1)))))
            if not stale:
                raise _busy(url, held)
            log.warning("kernel store %s: taking over the stale lease of pid %s on %s",
                        url, held.get("pid"), held.get("host"))
            fs.rm(path)
        token = uuid.uuid4().hex
        data = json.dumps(_holder(token)).encode()
        try:
            with fs.open(path, "xb") as f:  # create only if absent, where the store can
                f.write(data)
        except FileExistsError:
            raise _busy(url, _read_fs_holder(fs, path)) from None
        except (NotImplementedError, ValueError):
            fs.pipe_file(path, data)
        held = _read_fs_holder(fs, path)
        if not held or held.get("token") != token:  # another taker wrote last
            raise _busy(url, held)
        lease = cls(url, path, token, fs=fs)
        lease._beat = threading.Thread(target=lease._heartbeat, args=(ttl_s / 4,), daemon=True,
                                       name=f"lease {url}")
        lease._beat.start()
        return lease

    def _heartbeat(self, every_s: float) -> None:
        """Refresh the lease object's heartbeat while it is still this run's."""
        while not self._stop.wait(every_s):
            try:
                held = _read_fs_holder(self.fs, self.path)
                if not held or held.get("token") != self.token:
                    log.warning("kernel store %s: this run's lease was taken over", self.url)
                    return
                held["heartbeat"] = time.time()
                self.fs.pipe_file(self.path, json.dumps(held).encode())
            except Exception as err:  # a transient storage error: try again next beat
                log.warning("kernel store %s: lease heartbeat failed: %s", self.url, err)

    @property
    def held(self) -> bool:
        return self.fd is not None or (self.fs is not None and not self._stop.is_set())

    def release(self) -> None:
        """Give the store back (idempotent)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)  # the file stays: removing it would race a new holder
            finally:
                os.close(fd)  # drops the flock
        elif self.fs is not None and not self._stop.is_set():
            self._stop.set()
            held = _read_fs_holder(self.fs, self.path)
            if held and held.get("token") == self.token:
                self.fs.rm(self.path)

    def __enter__(self) -> StoreLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_local_holder(path: str) -> dict | None:
    """The holder a lease file names; a holder still writing it is waited for briefly."""
    for _ in range(20):
        try:
            with open(path, "rb") as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            time.sleep(0.025)
    return None


def _read_fs_holder(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:  # half-written or foreign: treat as held, holder unknown
        return {}
