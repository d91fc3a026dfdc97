"""The shard actors of one index version: launch, health-check, pick a live replica, restart the dead."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.metrics import REPLICA_DEATHS, REPLICA_RESTARTS, REPLICA_UP
from cluster.placement import choose_node
from cluster.shard import Shard, ShardConfig

RemoteShard = ray.remote(Shard)
PROBE_INTERVAL_S = 1.0  # a ready replica is health-probed at most this often


@dataclass(eq=False)
class Replica:
    """One shard actor and what is known of it."""

    handle: ray.actor.ActorHandle
    ready: ray.ObjectRef  # health() of the freshly started actor
    shard: int
    node: str | None = None  # the node it was placed on (None: left to Ray)
    state: str = "starting"  # starting | ready | dead
    inflight: int = 0
    serial: int = field(default_factory=itertools.count().__next__)  # unique per started actor
    started_at: float = field(default_factory=time.monotonic)
    info: dict = field(default_factory=dict)
    probe: ray.ObjectRef | None = None  # a health() call in flight, while ready
    probed_at: float = field(default_factory=time.monotonic)

    @property
    def node_id(self) -> str | None:
        """The node it runs on once it reported, else the one it was placed on."""
        return self.info.get("node_id") or self.node


class ReplicaSet:
    """R replicas of each shard of one version; calls go to the least loaded live replica, and a dead
    replica is restarted (at most once per backoff) until the set is stopped.

    With `place` each replica is pinned (softly) to a node: the replicas of one shard to distinct
    nodes while the cluster has enough, the shards spread so that every node holds about as many."""

    def __init__(
        self,
        shards: list[ShardConfig],
        replicas: int,
        actor_options: dict[str, Any],
        restart_backoff_s: float,
        place: bool = True,
    ) -> None:
        self.shards, self.actor_options, self.restart_backoff_s = shards, actor_options, restart_backoff_s
        self.place = place
        self._lock = threading.Lock()
        self._rotation = itertools.count()
        self._stopped = False
        self._addresses: dict[str, str] = {}  # node id → its address, as of the latest launch
        self._rows: list[list[Replica]] = [[] for _ in shards]
        nodes = self._nodes()
        for shard in range(len(shards)):
            for _ in range(replicas):
                self._rows[shard].append(self._launch(shard, nodes))

    @classmethod
    def start(
        cls,
        shards: list[ShardConfig],
        replicas: int,
        actor_options: dict[str, Any],
        restart_backoff_s: float,
        timeout_s: float,
        place: bool = True,
    ) -> ReplicaSet:
        """Launch every replica and wait until all pass their health check; else stop them, ValueError."""
        started = cls(shards, replicas, actor_options, restart_backoff_s, place)
        flat = [replica for row in started._rows for replica in row]
        try:
            infos = ray.get([replica.ready for replica in flat], timeout=timeout_s)
        except (RayActorError, RayTaskError, GetTimeoutError) as error:
            started.stop()
            cause = [line.strip() for line in str(error).splitlines() if line.strip()][-1:] or [repr(error)]
            raise ValueError(
                f"index version {shards[0].version!r} refused: a shard failed to start: {cause[0]}"
            ) from error
        for replica, info in zip(flat, infos):
            started._set_ready(replica, info)
        return started

    def _nodes(self) -> list[str]:
        """Alive nodes with CPUs enough for one replica (none when placement is left to Ray)."""
        alive = [node for node in ray.nodes() if node["Alive"]]
        self._addresses.update((node["NodeID"], node["NodeManagerAddress"]) for node in alive)
        if not self.place:
            return []
        need = self.actor_options.get("num_cpus", 1)
        return [node["NodeID"] for node in alive if node["Resources"].get("CPU", 0) >= need]

    def _launch(self, shard: int, nodes: list[str]) -> Replica:
        """Start one replica of `shard`, on the least loaded node not holding a live one of it."""
        live = [r for row in self._rows for r in row if r.state != "dead" and r.node_id is not None]
        avoid = [r.node_id for r in live if r.shard == shard]
        node = choose_node(nodes, Counter(r.node_id for r in live), avoid)
        options = dict(self.actor_options)
        if node is not None:  # soft: a node that is gone or full does not stop the replica starting
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node, soft=True, _spill_on_unavailable=True
            )
        handle = RemoteShard.options(**options).remote(self.shards[shard])
        return Replica(handle=handle, ready=handle.health.remote(), shard=shard, node=node)

    def _set_ready(self, replica: Replica, info: dict) -> None:
        replica.state, replica.info = "ready", info
        REPLICA_UP.set(1, tags=self._tags(replica.shard) | {"node": str(info.get("node_id"))})

    def _refresh(self, shard: int, probe: bool = False) -> None:
        """Promote started replicas, restart dead ones once their backoff is over; with `probe`
        (the health path, not the search path) also health-probe ready ones. Holds the lock."""
        tags = self._tags(shard)
        for slot, replica in enumerate(self._rows[shard]):
            if replica.state == "starting" and ray.wait([replica.ready], timeout=0)[0]:
                try:
                    self._set_ready(replica, ray.get(replica.ready))
                except (RayActorError, RayTaskError):
                    replica.state = "dead"
            if probe and replica.state == "ready" and not self._probe(replica):
                self._mark_dead(replica, tags)
            backoff_over = time.monotonic() - replica.started_at >= self.restart_backoff_s
            if replica.state == "dead" and not self._stopped and backoff_over:
                self._rows[shard][slot] = self._launch(shard, self._nodes())
                REPLICA_RESTARTS.inc(tags=tags)

    @staticmethod
    def _probe(replica: Replica) -> bool:
        """False once the replica's latest health probe failed; sends the next probe when due."""
        if replica.probe is not None and ray.wait([replica.probe], timeout=0)[0]:
            try:
                ray.get(replica.probe)
            except (RayActorError, RayTaskError):
                return False
            replica.probe = None
        if replica.probe is None and time.monotonic() - replica.probed_at >= PROBE_INTERVAL_S:
            replica.probe, replica.probed_at = replica.handle.health.remote(), time.monotonic()
        return True

    def _mark_dead(self, replica: Replica, tags: dict[str, str]) -> None:
        """The replica's actor is gone or broken: kill what is left of it, to be restarted."""
        replica.state = "dead"
        ray.kill(replica.handle, no_restart=True)
        REPLICA_DEATHS.inc(tags=tags)
        REPLICA_UP.set(0, tags=tags | {"node": str(replica.info.get("node_id"))})

    def _tags(self, shard: int) -> dict[str, str]:
        return {"version": self.shards[shard].version, "shard": str(shard)}

    def acquire(self, shard: int, exclude: set[int]) -> Replica | None:
        """The least loaded live replica of `shard` not in `exclude` (serials), counted in flight."""
        with self._lock:
            self._refresh(shard)
            live = [r for r in self._rows[shard] if r.state == "ready" and r.serial not in exclude]
            if not live:
                return None
            turn = next(self._rotation) % len(live)
            replica = min(live[turn:] + live[:turn], key=lambda r: r.inflight)  # rotating ties
            replica.inflight += 1
            return replica

    def release(self, replica: Replica, died: bool) -> None:
        """A call to `replica` ended; `died`: its actor is gone, so stop it and let it be restarted."""
        with self._lock:
            replica.inflight -= 1
            if died and replica.state == "ready":
                self._mark_dead(replica, self._tags(replica.shard))

    def states(self) -> list[list[dict]]:
        """Per shard, per replica: state, in-flight calls, node (id and address) and pid."""
        with self._lock:
            for shard in range(len(self._rows)):
                self._refresh(shard, probe=True)
            return [
                [
                    {
                        "state": r.state,
                        "inflight": r.inflight,
                        "node_id": r.info.get("node_id"),
                        "node_ip": self._addresses.get(r.info.get("node_id", "")),
                        "pid": r.info.get("pid"),
                    }
                    for r in row
                ]
                for row in self._rows
            ]

    def handles(self) -> list[list[ray.actor.ActorHandle]]:
        return [[replica.handle for replica in row] for row in self._rows]

    def stop(self) -> None:
        """Kill every actor; nothing is restarted afterwards."""
        with self._lock:
            self._stopped = True
            for row in self._rows:
                for replica in row:
                    ray.kill(replica.handle, no_restart=True)
                    if replica.state == "ready":
                        tags = self._tags(replica.shard) | {"node": str(replica.info.get("node_id"))}
                        REPLICA_UP.set(0, tags=tags)
                    replica.state = "dead"
