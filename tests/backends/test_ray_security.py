"""The embedded Ray is for this machine only: every listener of it on loopback while a fit
runs, token authentication whatever this process's environment says, no dashboard process; a
Ray that cannot be confined is refused. All on a live embedded Ray."""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
import psutil  # noqa: E402  (Ray's own dependency: importable once ray is)

from ray_convrfm.backends import embedded_ray  # noqa: E402


def _external_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def _refused(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        return s.connect_ex((ip, port)) != 0


def test_a_ray_that_cannot_be_confined_is_refused(monkeypatch):
    """Ray started without the settings that confine it listens on every interface: start_ray
    names the listeners, shuts that Ray down and raises."""
    if not _external_addresses():
        pytest.skip("this machine has no address but loopback")
    if ray.is_initialized():
        ray.shutdown()

    @contextlib.contextmanager
    def unconfined():  # token auth on, but Ray left to pick its node address
        with monkeypatch.context() as m:
            m.setenv("RAY_AUTH_MODE", "token")
            embedded_ray._reload_ray_auth()
            yield

    monkeypatch.setattr(embedded_ray, "_embedded_settings", unconfined)
    with pytest.raises(embedded_ray.RayConfinementError,
                       match=r"could not be confined.*gcs_server \(pid \d+\) listens on "
                             r"(::|0\.0\.0\.0|[0-9.]+):\d+.*address=\.\.\."):
        embedded_ray.start_ray(1)
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def embedded():
    """start_ray's embedded Ray, started while this process's environment turns token
    authentication off; yields this process's environment right after the start."""
    if ray.is_initialized():
        ray.shutdown()
    keep = {k: os.environ[k] for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
            if k in os.environ}
    with pytest.MonkeyPatch.context() as m:
        m.setenv("RAY_AUTH_MODE", "disabled")
        m.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
        embedded_ray.start_ray(2)
        env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",
                                               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        yield {"env": env, "token_env": keep}
        ray.shutdown()


def test_every_listener_is_on_loopback_while_a_fit_runs(embedded):
    """While a workers=2 fit runs, every listening socket of the driver, the GCS, the raylet,
    its agents and the shard workers is on 127.0.0.1, and the GCS and raylet ports refuse a
    connection on the machine's other addresses."""
    from ray_convrfm import ConvRFM, Options

    rng = np.random.default_rng(0)
    X = rng.random((300, 1, 12, 12), dtype=np.float32)
    y = rng.integers(0, 3, 300)
    me = psutil.Process()
    errors, done = [], threading.Event()

    def fit():
        try:
            ConvRFM(depth=2, iters=2, agop_samples=20, options=Options.of(workers=2)).fit(X, y)
        except BaseException as err:  # reported by the test thread
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=fit)
    thread.start()
    seen: set[tuple[int, str, str, int]] = set()
    while not done.is_set():
        seen |= set(embedded_ray.listening_sockets([*embedded_ray.embedded_ray_processes(), me]))
        time.sleep(0.1)
    thread.join()
    assert not errors, errors

    names = {name for _, name, _, _ in seen}
    workers = {pid for pid, name, _, _ in seen if name.startswith("ray::RayShardWorker")}
    assert {"gcs_server", "raylet"} <= names and len(workers) >= 2, sorted(seen)
    assert me.pid in {pid for pid, _, _, _ in seen}  # the driver's own gRPC server
    wide = sorted(s for s in seen if not embedded_ray._is_loopback(s[2]))
    assert not wide, f"listening beyond loopback: {wide}"

    head = [port for _, name, _, port in seen if name in ("gcs_server", "raylet")]
    for ip in _external_addresses():
        assert all(_refused(ip, port) for port in head), (ip, head)


def test_no_dashboard_process(embedded):
    """Neither Ray's dashboard nor its API server runs; the dashboard agent, which the raylet
    requires, listens on loopback only (checked above with every other listener)."""
    cmdlines = {}
    for p in embedded_ray.embedded_ray_processes():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):  # a worker ended
            cmdlines[p] = " ".join(p.cmdline())
    assert any("ray::DashboardAgent" in c for c in cmdlines.values())  # Ray's processes
    assert not [c for c in cmdlines.values() if "dashboard/dashboard.py" in c]
    assert "dashboard" not in ray._private.worker._global_node.all_processes
    agents = [p for p, c in cmdlines.items() if "DashboardAgent" in c or "dashboard/agent" in c]
    sockets = embedded_ray.listening_sockets(agents)
    assert all(embedded_ray._is_loopback(ip) for *_, ip, _ in sockets)


def test_token_authentication_is_on_and_the_environment_is_restored(embedded):
    """The GCS refuses a client without the token or with a wrong one, though this process's
    environment said RAY_AUTH_MODE=disabled when the Ray started; that environment is this
    process's again afterwards, and Ray's flag in this process too."""
    from ray._private import ray_constants

    assert embedded["env"] == {"RAY_AUTH_MODE": "disabled",
                               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": None}
    assert ray_constants.ENABLE_RAY_CLUSTER is (sys.platform not in ("darwin", "win32"))
    address = ray._private.worker._global_node.gcs_address
    probe = ("import sys, ray\n"
             "from ray._raylet import GcsClient\n"
             "try:\n"
             "    GcsClient(address=sys.argv[1]).internal_kv_keys(b'', namespace=None,"
             " timeout=30)\n"
             "    print('CONNECTED')\n"
             "except Exception as err:\n"
             "    print('REFUSED', type(err).__name__, err)\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}

    def client(**env) -> str:
        run = subprocess.run([sys.executable, "-c", probe, address], env={**base, **env},
                             capture_output=True, text=True, timeout=120)
        return run.stdout.strip() or run.stderr[-2000:]

    assert client(RAY_AUTH_MODE="disabled").startswith("REFUSED AuthenticationError")
    assert client(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64).startswith(
        "REFUSED AuthenticationError")
    assert client(RAY_AUTH_MODE="token", **embedded["token_env"]) == "CONNECTED"
