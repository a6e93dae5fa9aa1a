"""Starting Ray: join a cluster, or an embedded one confined to this machine.

The embedded Ray listens on 127.0.0.1 only, with token authentication on and no dashboard;
``start_ray`` checks that after starting and refuses (``RayConfinementError``) otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from pathlib import Path

log = logging.getLogger(__name__)


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
            "Ray needs it: upgrade Ray, or join a cluster you secured with address=...") from err
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
                "with address=... instead")
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
