"""S shards × R replicas of one index version on Ray: fan-out search, merge, failover, hot swap."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray
from pydantic import ConfigDict, Field, field_validator
from ray.exceptions import RayActorError

from cluster import storage
from cluster.bm25 import query_tokens
from cluster.config import Config
from cluster.index_store import Manifest, check_index_root, load_manifest, resolve_version
from cluster.merge import SearchResult, merge_hits
from cluster.metrics import COVERAGE, FAN_OUT_MS, INDEX_VERSION
from cluster.replicas import Replica, ReplicaSet
from cluster.shard import SearchConfig, ShardConfig, ShardHits

INLINE_QUERY_BYTES = 64 * 1024  # smaller query batches travel inside each call


class ShardUnavailableError(RuntimeError):
    """A shard had no live replica and the group does not allow partial answers."""


class ShardGroupConfig(Config):
    """Where the index lives (a path, or an s3:// / gs:// URI), how many replicas of each shard, how
    the actors search (`search`, handed to each shard as it is) and how the group fails over."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)
    index_root: str = Field(alias="root")
    replicas: int = Field(1, ge=1)  # per shard, on distinct nodes where the cluster has them
    shard_cpus: float = Field(1.0, ge=0)  # Ray CPUs reserved per shard replica
    allow_partial: bool = True  # answer from the shards that answered when one has no live replica
    call_timeout_s: float = Field(30.0, gt=0)
    start_timeout_s: float = Field(300.0, gt=0)
    drain_timeout_s: float = Field(60.0, gt=0)
    restart_backoff_s: float = Field(1.0, ge=0)
    spread: bool = True  # replicas of a shard on distinct nodes, shards spread over the nodes
    search: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("index_root")
    @classmethod
    def _expand(cls, root: str) -> str:
        return root if storage.is_uri(root) else os.path.expanduser(root)


@dataclass(eq=False)
class _Route:
    """The routing table of one version; a query uses exactly one route."""

    version: str
    manifest: Manifest
    replicas: ReplicaSet
    inflight: int = 0  # searches using this route


class ShardGroup:
    """Routes each query batch to one version's replica set and swaps versions.

    A plain class: serving holds one in each Retriever replica; training makes it an actor
    (`ray.remote(ShardGroup)` with max_concurrency > 1) that the workers search.
    """

    def __init__(self, config: ShardGroupConfig, version: str | None = None) -> None:
        check_index_root(config.index_root)
        self.config = config
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a route's last search ends
        self._swap_lock = threading.Lock()
        version = resolve_version(config.index_root, version)
        self._route = self._start_route(version, load_manifest(config.index_root, version))
        INDEX_VERSION.set(1, tags={"version": version})

    @property
    def version(self) -> str:
        return self._route.version

    @property
    def manifest(self) -> Manifest:
        return self._route.manifest

    def _start_route(self, version: str, manifest: Manifest) -> _Route:
        """Start every replica of `version` and wait until all pass their health check."""
        cfg = self.config
        shards = [
            ShardConfig(index_root=cfg.index_root, version=version, shard=shard, search=cfg.search)
            for shard in range(len(manifest.shards))
        ]
        options: dict = {"num_cpus": cfg.shard_cpus, "max_concurrency": 2}
        if cfg.spread:
            options["scheduling_strategy"] = "SPREAD"
        replicas = ReplicaSet.start(
            shards, cfg.replicas, options, cfg.restart_backoff_s, cfg.start_timeout_s, place=cfg.spread
        )
        return _Route(version=version, manifest=manifest, replicas=replicas)

    # ---- search ------------------------------------------------------------------------
    def _check_queries(self, queries: np.ndarray, k: int, dim: int) -> None:
        if not isinstance(queries, np.ndarray) or queries.dtype != np.float32:
            raise ValueError(
                f"queries must be a float32 numpy array, got "
                f"{getattr(queries, 'dtype', type(queries).__name__)}"
            )
        if queries.ndim != 2 or queries.shape[1] != dim or queries.shape[0] == 0:
            raise ValueError(f"queries must have shape (B ≥ 1, {dim}), got {queries.shape}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")

    def _fan_out(
        self, route: _Route, method: str, queries: np.ndarray | list, k: int, return_vectors: bool
    ) -> list[ShardHits | None]:
        """One replica per shard in parallel (its `method`: "search" or "search_bm25"); a failed call
        moves to another replica of that shard."""
        shards = len(route.manifest.shards)
        hits: list[ShardHits | None] = [None] * shards
        tried: list[set[int]] = [set() for _ in range(shards)]
        pending: dict[ray.ObjectRef, tuple[int, Replica]] = {}
        large = isinstance(queries, np.ndarray) and queries.nbytes > INLINE_QUERY_BYTES
        query_ref = ray.put(queries) if large else queries  # one copy for S shards

        def submit(shard: int) -> None:
            replica = route.replicas.acquire(shard, tried[shard])
            if replica is not None:
                tried[shard].add(replica.serial)
                call = getattr(replica.handle, method).remote(query_ref, k, return_vectors)
                pending[call] = (shard, replica)

        for shard in range(shards):
            submit(shard)
        deadline = time.monotonic() + self.config.call_timeout_s
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:  # timed out: give up on the slow calls, try other replicas once
                for ref, (shard, replica) in list(pending.items()):
                    pending.pop(ref)
                    ray.cancel(ref)
                    route.replicas.release(replica, died=False)
                    submit(shard)
                deadline = time.monotonic() + self.config.call_timeout_s
                continue
            shard, replica = pending.pop(done[0])
            try:
                hits[shard] = ray.get(done[0])
                route.replicas.release(replica, died=False)
            except RayActorError:
                route.replicas.release(replica, died=True)
                submit(shard)
        return hits

    def search(self, queries: np.ndarray, k: int, return_vectors: bool = False) -> SearchResult:
        """Global top-k for each query row, from one version; coverage < 1 when a shard is down."""
        return self.search_retrievers(queries, [], k, ("dense",), return_vectors)["dense"]

    def search_retrievers(
        self,
        queries: np.ndarray,
        questions: Sequence[str],
        k: int,
        retrievers: Sequence[str],
        return_vectors: bool = False,
    ) -> dict[str, SearchResult]:
        """Global top-k of each named retriever ("dense": query vectors; "bm25": the questions' texts),
        every one from the same version."""
        with self._lock:
            route = self._route
            route.inflight += 1
        try:
            self._check_queries(queries, k, route.manifest.dim)
            if "bm25" in retrievers and len(questions) != len(queries):
                raise ValueError(f"{len(questions)} questions for {len(queries)} query rows")
            found = {}
            for name in retrievers:
                if name == "dense":
                    found[name] = self._merged(route, "search", queries, int(k), return_vectors)
                elif name == "bm25":
                    tokens = query_tokens(questions, route.manifest)
                    found[name] = self._merged(route, "search_bm25", tokens, int(k), return_vectors)
                else:
                    raise ValueError(f"unknown retriever {name!r}: expected 'dense' or 'bm25'")
            return found
        finally:
            with self._idle:
                route.inflight -= 1
                if route.inflight == 0:
                    self._idle.notify_all()

    def _merged(
        self, route: _Route, method: str, queries: np.ndarray | list, k: int, return_vectors: bool
    ) -> SearchResult:
        start = time.perf_counter()
        hits = self._fan_out(route, method, queries, k, return_vectors)
        answered = [h for h in hits if h is not None]
        coverage = len(answered) / len(hits)
        COVERAGE.set(coverage, tags={"version": route.version})
        if not answered or (coverage < 1.0 and not self.config.allow_partial):
            missing = [s for s, h in enumerate(hits) if h is None]
            raise ShardUnavailableError(f"index {route.version}: no live replica for shards {missing}")
        result = merge_hits(answered, k, coverage, return_vectors)
        result.timings = {
            "total_ms": (time.perf_counter() - start) * 1e3,
            "max_shard_ms": max(h.search_ms for h in answered),
        }
        FAN_OUT_MS.observe(result.timings["total_ms"], tags={"version": route.version})
        return result

    # ---- versions and health ---------------------------------------------------------------
    def _check_compatible(self, manifest: Manifest) -> None:
        current = self._route.manifest
        if manifest.dim != current.dim:
            raise ValueError(
                f"index version {manifest.version!r} refused: dim {manifest.dim} != serving dim {current.dim}"
            )
        if manifest.encoder != current.encoder:
            raise ValueError(
                f"index version {manifest.version!r} refused: encoder {manifest.encoder!r} "
                f"!= serving encoder {current.encoder!r}"
            )

    def swap(self, version: str) -> None:
        """Start, check and health-check `version`, switch to it, drain and stop the old actors."""
        with self._swap_lock:
            manifest = load_manifest(self.config.index_root, version)
            self._check_compatible(manifest)
            new_route = self._start_route(version, manifest)
            with self._lock:
                old, self._route = self._route, new_route
            INDEX_VERSION.set(0, tags={"version": old.version})
            INDEX_VERSION.set(1, tags={"version": version})
            self._drain(old)

    def _drain(self, route: _Route) -> None:
        """Wait (up to drain_timeout_s) for the searches still using `route`, then stop its actors."""
        with self._idle:
            self._idle.wait_for(lambda: route.inflight == 0, timeout=self.config.drain_timeout_s)
        route.replicas.stop()

    def health(self) -> dict:
        """Version, coverage and per-replica state (state, in-flight calls, node, pid)."""
        route = self._route
        shards = route.replicas.states()
        live = sum(any(r["state"] == "ready" for r in row) for row in shards)
        return {"version": route.version, "coverage": live / len(shards), "shards": shards}

    def replica_handles(self) -> list[list[ray.actor.ActorHandle]]:
        """Current actor handles per shard (for tests, benchmarks and operators)."""
        return self._route.replicas.handles()

    def close(self) -> None:
        with self._swap_lock:
            self._route.replicas.stop()
