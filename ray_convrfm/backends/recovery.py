"""Surviving a lost node: tasks wait for their actor's restart, bounded by a stated time.

Ray retries an actor's tasks while the actor restarts (``max_task_retries=-1``: the tasks are
pure functions of their arguments and the shard, so running one twice is safe) and restarts an
actor at most ``max_restarts`` times. A lost node takes Ray some seconds to declare dead and an
autoscaler some more to replace; until then the tasks wait. What Ray does not bound is how long:
a cluster that cannot give the actor back (no node with the bundle's resources) leaves them
pending forever. ``NodeWatch`` watches the nodes the workers run on while the driver waits: it
logs each loss and each restart, and stops the wait with one ``WorkerLostError`` naming the lost
node when a worker stays away longer than ``recovery_timeout_s`` or is out of restarts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Seconds between looks at the cluster's nodes while waiting for results.
POLL_S = 1.0


class WorkerLostError(RuntimeError):
    """A worker's node was lost and the cluster did not give the worker back."""


@dataclass
class _Lost:
    since: float
    node: str
    ping: object  # a call on the restarting actor: it returns once the tasks before it ran


def _actor_state(actor) -> tuple[str, str] | None:
    """(state, node id) of an actor as the GCS holds them ("ALIVE", "RESTARTING", "DEAD"),
    read without a task: a task on the actor would wait behind those submitted before it.
    None where this Ray does not expose the table (then the ping says when it is back)."""
    try:
        from ray._private import state

        info = state.actors(actor._actor_id.hex())
        return info["State"], info["Address"]["NodeID"]
    except Exception:  # noqa: BLE001 - a private table: fall back to the ping
        return None


class NodeWatch:
    """The node each worker's actor runs on, and the workers lost with theirs.

    ``resume`` is the sentence the error ends with (how a rerun resumes, or how to make it)."""

    def __init__(self, actors: list, recovery_timeout_s: float, max_restarts: int,
                 resume: str):
        import ray

        self.actors, self.timeout, self.max_restarts = actors, recovery_timeout_s, max_restarts
        self.resume = resume
        self.nodes: list[str] = ray.get([a.node.remote() for a in actors])
        self.addresses = _addresses()
        self.lost: dict[int, _Lost] = {}
        self.restarts = 0  # workers given back so far
        self._last = 0.0

    def check(self) -> None:
        """Log newly lost workers and those back; raise when one is gone for good."""
        import ray

        now = time.monotonic()
        if now - self._last < POLL_S:
            return
        self._last = now
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for k, node in enumerate(self.nodes):
            if k not in self.lost and node not in alive:
                log.warning("lost node %s: worker %d's tasks wait for its restart (at most %d "
                            "restarts, up to %.0f s)", self.describe(node), k,
                            self.max_restarts, self.timeout)
                self.lost[k] = _Lost(now, node, self.actors[k].node.remote())
        for k, lost in list(self.lost.items()):
            seen = _actor_state(self.actors[k])
            if seen is not None and seen[0] == "DEAD":
                raise self.error(k, f"could not be restarted (max_restarts="
                                    f"{self.max_restarts})")
            back = seen is not None and seen[0] == "ALIVE" and seen[1] != lost.node
            done = [] if back or seen is not None else ray.wait([lost.ping], timeout=0)[0]
            if back or done:
                try:
                    self.nodes[k] = seen[1] if back else ray.get(lost.ping)
                except ray.exceptions.RayActorError as exc:
                    raise self.error(k, f"could not be restarted ({type(exc).__name__})") \
                        from exc
                self.addresses = _addresses()
                del self.lost[k]
                self.restarts += 1
                log.warning("worker %d is back on node %s after %.1f s", k,
                            self.describe(self.nodes[k]), now - lost.since)
            elif now - lost.since > self.timeout:
                raise self.error(k, f"was not given back within recovery_timeout_s="
                                    f"{self.timeout:g} s")

    def describe(self, node: str) -> str:
        address = self.addresses.get(node)
        return f"{node[:12]} ({address})" if address else node[:12]

    def error(self, k: int, what: str) -> WorkerLostError:
        return WorkerLostError(f"worker {k} was lost with node {self.describe(self.nodes[k])} "
                               f"and {what}; {self.resume}")

    def translate(self, exc: BaseException) -> WorkerLostError | None:
        """The error naming the lost node for a Ray actor error of one of the workers (None
        for anything else)."""
        import ray

        if not isinstance(exc, ray.exceptions.RayActorError):
            return None
        actor_id = getattr(exc, "actor_id", None)
        ids = [a._actor_id.hex() for a in self.actors]
        k = ids.index(actor_id) if actor_id in ids else next(iter(self.lost), 0)
        return self.error(k, f"could not be restarted (max_restarts={self.max_restarts}: "
                             f"{type(exc).__name__})")


def _addresses() -> dict[str, str]:
    import ray

    return {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes()}


def wait_watched(futures: list, watch: NodeWatch | None, bar=None) -> list:
    """``ray.get(futures)``, checking ``watch`` between short waits, advancing ``bar`` by the
    futures done; a worker lost for good becomes its ``WorkerLostError``. A task's own
    ``OSError`` or ``ValueError`` (a store that cannot be written, a damaged block, bad
    input) is raised as the worker raised it, with its class and errno, as in process (Ray's
    ``RayTaskError``, with the remote traceback, is its ``__cause__``)."""
    import ray

    pending = list(futures)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1 if bar is not None else len(pending),
                                     timeout=POLL_S if watch is not None else None)
            if bar is not None:
                bar.update(len(done))
            if watch is not None and pending:
                watch.check()
        return ray.get(futures)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, (OSError, ValueError)):
            raise exc.cause from exc
        raise
    except ray.exceptions.RayActorError as exc:
        lost = watch.translate(exc) if watch is not None else None
        if lost is None:
            raise
        raise lost from exc
