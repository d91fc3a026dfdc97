"""S shards × R replicas of one index version on Ray: fan-out search, merge, failover, hot swap."""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.index_store import Manifest, check_index_root, load_manifest, resolve_version
from cluster.merge import merge_topk
from cluster.shard import Shard, ShardConfig, ShardHits

RemoteShard = ray.remote(Shard)
INLINE_QUERY_BYTES = 64 * 1024  # smaller query batches travel inside each call


class ShardUnavailableError(RuntimeError):
    """A shard had no live replica and the group does not allow partial answers."""


@dataclass
class SearchResult:
    """Global top-k of one query batch, all from one index version."""

    scores: np.ndarray  # (B, k) float32, inner products, descending
    ids: np.ndarray  # (B, k) int64 global passage ids (-1 = no hit)
    titles: list[list[str]]
    texts: list[list[str]]
    vectors: np.ndarray | None  # (B, k, d) float32 document vectors when asked
    version: str
    coverage: float  # fraction of shards that answered (1.0 = full)
    timings: dict[str, float] = field(default_factory=dict)  # total_ms, max_shard_ms


@dataclass
class ShardGroupConfig:
    """Where the index lives, how many replicas, and how the actors search and fail over."""

    index_root: str
    replicas: int = 1
    faiss_threads: int = 1
    blas_threshold: int | None = None  # FAISS's distance_compute_blas_threshold in the shard actors
    allow_partial: bool = True
    search_params: dict[str, float] = field(default_factory=dict)  # e.g. {"efSearch": 256}
    num_cpus_per_replica: float = 1.0
    call_timeout_s: float = 30.0
    start_timeout_s: float = 300.0
    drain_timeout_s: float = 60.0
    restart_backoff_s: float = 1.0
    spread: bool = True  # SPREAD scheduling over nodes
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        check_index_root(self.index_root)
        if self.replicas < 1:
            raise ValueError(f"replicas must be ≥ 1, got {self.replicas}")
        if self.faiss_threads < 1:
            raise ValueError(f"faiss_threads must be ≥ 1, got {self.faiss_threads}")
        if self.blas_threshold is not None and self.blas_threshold < 1:
            raise ValueError(f"blas_threshold must be ≥ 1 or None, got {self.blas_threshold}")
        if self.num_cpus_per_replica < 0:
            raise ValueError(f"num_cpus_per_replica must be ≥ 0, got {self.num_cpus_per_replica}")
        for name in ("call_timeout_s", "start_timeout_s", "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(eq=False)
class _Replica:
    handle: ray.actor.ActorHandle
    ready: ray.ObjectRef  # health() of the freshly started actor
    state: str = "starting"  # starting | ready | dead
    inflight: int = 0
    serial: int = field(default_factory=itertools.count().__next__)  # unique per started actor
    restarted_at: float = 0.0
    info: dict = field(default_factory=dict)


@dataclass(eq=False)
class _Route:
    """The routing table of one version; a query uses exactly one route."""

    version: str
    manifest: Manifest
    replicas: list[list[_Replica]]  # [shard][replica]
    inflight: int = 0
    retired: bool = False


class ShardGroup:
    """Plain class; serving/training wrap it with `ray.remote(ShardGroup)` (threaded) where needed."""

    def __init__(self, config: ShardGroupConfig, version: str | None = None) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._rotation = itertools.count()
        version = resolve_version(config.index_root, version)
        self._route = self._start_route(version, load_manifest(config.index_root, version))

    @property
    def version(self) -> str:
        return self._route.version

    @property
    def manifest(self) -> Manifest:
        return self._route.manifest

    # ---- actors ------------------------------------------------------------------------
    def _launch(self, version: str, shard: int) -> _Replica:
        config = ShardConfig(index_root=self.config.index_root, version=version, shard=shard,
                             faiss_threads=self.config.faiss_threads, blas_threshold=self.config.blas_threshold,
                             search_params=dict(self.config.search_params),
                             verify_checksums=self.config.verify_checksums)
        options: dict = {"num_cpus": self.config.num_cpus_per_replica, "max_concurrency": 2}
        if self.config.spread:
            options["scheduling_strategy"] = "SPREAD"
        handle = RemoteShard.options(**options).remote(config)
        return _Replica(handle=handle, ready=handle.health.remote(), restarted_at=time.monotonic())

    def _start_route(self, version: str, manifest: Manifest) -> _Route:
        """Start every replica of `version` and wait until all pass their health check."""
        replicas = [[self._launch(version, s) for _ in range(self.config.replicas)]
                    for s in range(len(manifest.shards))]
        route = _Route(version=version, manifest=manifest, replicas=replicas)
        flat = [r for row in replicas for r in row]
        try:
            infos = ray.get([r.ready for r in flat], timeout=self.config.start_timeout_s)
        except (RayActorError, RayTaskError, GetTimeoutError) as error:
            self._kill(route)
            cause = [line.strip() for line in str(error).splitlines() if line.strip()][-1:] or [repr(error)]
            raise ValueError(f"index version {version!r} refused: a shard failed to start: {cause[0]}") from error
        for replica, info in zip(flat, infos):
            replica.state, replica.info = "ready", info
        return route

    @staticmethod
    def _kill(route: _Route) -> None:
        for row in route.replicas:
            for replica in row:
                ray.kill(replica.handle, no_restart=True)
                replica.state = "dead"

    def _refresh(self, route: _Route, shard: int) -> None:
        """Promote started replicas, restart dead ones (at most once per backoff). Holds the lock."""
        for slot, replica in enumerate(route.replicas[shard]):
            if replica.state == "starting" and ray.wait([replica.ready], timeout=0)[0]:
                try:
                    replica.info, replica.state = ray.get(replica.ready), "ready"
                except (RayActorError, RayTaskError):
                    replica.state = "dead"
            backoff_over = time.monotonic() - replica.restarted_at >= self.config.restart_backoff_s
            if replica.state == "dead" and not route.retired and backoff_over:
                route.replicas[shard][slot] = self._launch(route.version, shard)

    def _pick(self, route: _Route, shard: int, tried: set[int]) -> _Replica | None:
        with self._lock:
            self._refresh(route, shard)
            live = [r for r in route.replicas[shard] if r.state == "ready" and r.serial not in tried]
            if not live:
                return None
            turn = next(self._rotation) % len(live)
            replica = min(live[turn:] + live[:turn], key=lambda r: r.inflight)  # least loaded, rotating ties
            replica.inflight += 1
            return replica

    def _release(self, replica: _Replica, died: bool) -> None:
        with self._lock:
            replica.inflight -= 1
            if died and replica.state == "ready":
                replica.state = "dead"
                ray.kill(replica.handle, no_restart=True)

    # ---- search ------------------------------------------------------------------------
    def _check_queries(self, queries: np.ndarray, k: int, dim: int) -> None:
        if not isinstance(queries, np.ndarray) or queries.dtype != np.float32:
            raise ValueError(f"queries must be a float32 numpy array, got "
                             f"{getattr(queries, 'dtype', type(queries).__name__)}")
        if queries.ndim != 2 or queries.shape[1] != dim or queries.shape[0] == 0:
            raise ValueError(f"queries must have shape (B ≥ 1, {dim}), got {queries.shape}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")

    def _fan_out(self, route: _Route, queries: np.ndarray, k: int, return_vectors: bool) -> list[ShardHits | None]:
        """One replica per shard in parallel; a failed call moves to another replica of that shard."""
        hits: list[ShardHits | None] = [None] * len(route.replicas)
        tried: list[set[int]] = [set() for _ in route.replicas]
        pending: dict[ray.ObjectRef, tuple[int, _Replica]] = {}
        query_ref = ray.put(queries) if queries.nbytes > INLINE_QUERY_BYTES else queries  # one copy for S shards

        def submit(shard: int) -> None:
            replica = self._pick(route, shard, tried[shard])
            if replica is not None:
                tried[shard].add(replica.serial)
                pending[replica.handle.search.remote(query_ref, k, return_vectors)] = (shard, replica)

        for shard in range(len(route.replicas)):
            submit(shard)
        deadline = time.monotonic() + self.config.call_timeout_s
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:  # timed out: give up on the slow calls, try other replicas once
                for ref, (shard, replica) in list(pending.items()):
                    pending.pop(ref)
                    ray.cancel(ref)
                    self._release(replica, died=False)
                    submit(shard)
                deadline = time.monotonic() + self.config.call_timeout_s
                continue
            shard, replica = pending.pop(done[0])
            try:
                hits[shard] = ray.get(done[0])
                self._release(replica, died=False)
            except RayActorError:
                self._release(replica, died=True)
                submit(shard)
        return hits

    def search(self, queries: np.ndarray, k: int, return_vectors: bool = False) -> SearchResult:
        """Global top-k for each query row, from one version; coverage < 1 when a shard is down."""
        start = time.perf_counter()
        with self._lock:
            route = self._route
            route.inflight += 1
        try:
            self._check_queries(queries, k, route.manifest.dim)
            hits = self._fan_out(route, queries, int(k), return_vectors)
        finally:
            with self._lock:
                route.inflight -= 1
        answered = [h for h in hits if h is not None]
        coverage = len(answered) / len(hits)
        if not answered or (coverage < 1.0 and not self.config.allow_partial):
            missing = [s for s, h in enumerate(hits) if h is None]
            raise ShardUnavailableError(f"index {route.version}: no live replica for shards {missing}")
        result = _merge_hits(answered, int(k), route.version, coverage, return_vectors)
        result.timings = {"total_ms": (time.perf_counter() - start) * 1e3,
                          "max_shard_ms": max(h.search_ms for h in answered)}
        return result

    # ---- versions and health ---------------------------------------------------------------
    def _check_compatible(self, manifest: Manifest) -> None:
        current = self._route.manifest
        if manifest.dim != current.dim:
            raise ValueError(f"index version {manifest.version!r} refused: dim {manifest.dim} != serving dim {current.dim}")
        if manifest.encoder != current.encoder:
            raise ValueError(f"index version {manifest.version!r} refused: encoder {manifest.encoder!r} "
                             f"!= serving encoder {current.encoder!r}")

    def swap(self, version: str) -> None:
        """Start, check and health-check `version`, switch to it, drain and stop the old actors."""
        with self._swap_lock:
            manifest = load_manifest(self.config.index_root, version)
            self._check_compatible(manifest)
            new_route = self._start_route(version, manifest)
            with self._lock:
                old, self._route = self._route, new_route
                old.retired = True
            self._drain(old)

    def _drain(self, route: _Route) -> None:
        deadline = time.monotonic() + self.config.drain_timeout_s
        while route.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        self._kill(route)

    def health(self) -> dict:
        """Version, coverage and per-replica state (state, in-flight calls, node, pid)."""
        route = self._route
        with self._lock:
            for shard in range(len(route.replicas)):
                self._refresh(route, shard)
            shards = [[{"state": r.state, "inflight": r.inflight, "node_id": r.info.get("node_id"),
                        "pid": r.info.get("pid")} for r in row] for row in route.replicas]
        live = sum(any(r["state"] == "ready" for r in row) for row in shards)
        return {"version": route.version, "coverage": live / len(shards), "shards": shards}

    def replica_handles(self) -> list[list[ray.actor.ActorHandle]]:
        """Current actor handles per shard (for tests, benchmarks and operators)."""
        return [[r.handle for r in row] for row in self._route.replicas]

    def close(self) -> None:
        with self._swap_lock, self._lock:
            self._route.retired = True
            self._kill(self._route)


def _merge_hits(hits: list[ShardHits], k: int, version: str, coverage: float, return_vectors: bool) -> SearchResult:
    """Merge per-shard hits (all of `version`) and gather titles, texts, vectors of the winners."""
    assert all(h.version == version for h in hits), "a query mixed index versions"
    scores, ids, part, column = merge_topk([h.scores for h in hits], [h.ids for h in hits], k)  # (B, k) each
    titles = [[hits[p].titles[b][c] if p >= 0 else "" for p, c in zip(part[b], column[b])] for b in range(len(ids))]
    texts = [[hits[p].texts[b][c] if p >= 0 else "" for p, c in zip(part[b], column[b])] for b in range(len(ids))]
    vectors = None
    if return_vectors:
        stacked = np.concatenate([h.vectors for h in hits], axis=1)  # (B, Σk_s, d)
        offsets = np.cumsum([0] + [h.ids.shape[1] for h in hits])[:-1]  # (S',)
        flat = np.where(part >= 0, offsets[np.maximum(part, 0)] + column, 0)  # (B, k)
        vectors = np.take_along_axis(stacked, flat[:, :, None], axis=1)  # (B, k, d)
        vectors[part < 0] = 0.0
    return SearchResult(scores=scores, ids=ids, titles=titles, texts=texts, vectors=vectors,
                        version=version, coverage=coverage)
