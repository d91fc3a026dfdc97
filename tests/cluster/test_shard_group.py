"""ShardGroup on a real local Ray: exactness vs one IndexFlatIP, ANN recall, failover, hot swap."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest
import ray
from ray.exceptions import RayActorError

from cluster.index_build import build_index_from_vectors
from cluster.index_store import load_manifest, version_dir
from cluster.passages import Passage
from cluster.shard import SearchConfig
from cluster.shard_group import ShardGroup, ShardGroupConfig, ShardUnavailableError

DIM = 32


def _passages(n: int, tag: str) -> list[Passage]:
    return [Passage(id=i, title=f"{tag}-{i}", text=f"{tag} passage {i}") for i in range(n)]


def _clustered(n: int, seed: int, centers: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centers, DIM)).astype(np.float32)  # (C, d)
    points = middle[rng.integers(0, centers, n)] + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)  # (N, d)


def _flat_reference(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index.search(queries, k)  # (B, k) each


def _config(root: Path, **kwargs) -> ShardGroupConfig:
    kwargs = {"shard_cpus": 0.05, "call_timeout_s": 20.0, "restart_backoff_s": 0.2} | kwargs
    return ShardGroupConfig(index_root=str(root), **kwargs)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    vectors = _clustered(3000, seed=0)
    queries = _clustered(40, seed=1)
    return vectors, queries


def _kill_and_wait(handle: ray.actor.ActorHandle) -> None:
    """ray.kill returns before the actor is gone; wait until a call to it fails, so the next
    search cannot be answered by the dying actor."""
    ray.kill(handle)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(handle.health.remote(), timeout=30)
        except RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor kept answering")


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    """Poll `condition` until it holds; fail naming `what` after a generous deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _stream(group: ShardGroup, queries: np.ndarray, stop: threading.Event, out: list) -> None:
    """Query until stopped; records (result or exception) per call."""
    while not stop.is_set():
        try:
            out.append(group.search(queries, 5))
        except Exception as error:  # recorded and asserted on by the test
            out.append(error)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_equals_flat(ray_session, tmp_path: Path, data, shards: int) -> None:
    vectors, queries = data
    n = 70 * shards + 5  # shards of ~70: k = 100 is larger than a shard
    version = build_index_from_vectors(vectors[:n], _passages(n, "a"), tmp_path, shards=shards)
    group = ShardGroup(_config(tmp_path))
    try:
        for k in (1, 10, 100):
            result = group.search(queries, k, return_vectors=True)
            scores, ids = _flat_reference(vectors[:n], queries, k)
            np.testing.assert_array_equal(result.ids, ids)
            np.testing.assert_allclose(result.scores, scores, atol=1e-5)
            expected_vectors = np.where(
                (ids >= 0)[..., None], vectors[:n][ids], 0.0
            )  # (B, k, d); -1 = padding
            np.testing.assert_array_equal(result.vectors, expected_vectors)
            assert (
                result.titles[3] == [f"a-{i}" if i >= 0 else "" for i in ids[3]]
                and result.texts[0][0] == f"a passage {ids[0, 0]}"
            )
            assert (result.version, result.coverage) == (version, 1.0)
    finally:
        group.close()


@pytest.mark.parametrize(
    "index_type,params",
    [("HNSW32", {"efSearch": 64}), ("IVF32,PQ16x4,RFlat", {"nprobe": 16, "k_factor_rf": 16})],
)
def test_ann_recall(ray_session, tmp_path: Path, data, index_type: str, params: dict) -> None:
    vectors, queries = data
    build_index_from_vectors(vectors, _passages(len(vectors), "a"), tmp_path, shards=2, index_type=index_type)
    group = ShardGroup(_config(tmp_path, search=SearchConfig(search_params=params)))
    try:
        result = group.search(queries, 10)
    finally:
        group.close()
    _, truth = _flat_reference(vectors, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(result.ids, truth)])
    assert recall >= 0.95, f"{index_type} recall@10 {recall:.3f}"


def test_replica_killed_mid_stream(ray_session, tmp_path: Path, data) -> None:
    vectors, queries = data
    build_index_from_vectors(vectors, _passages(len(vectors), "a"), tmp_path, shards=2)
    group = ShardGroup(_config(tmp_path, replicas=2))
    stop, results = threading.Event(), []
    worker = threading.Thread(target=_stream, args=(group, queries, stop, results))
    worker.start()
    try:
        _wait_for(lambda: len(results) >= 1, "a first answer")
        for shard in (0, 1):
            _kill_and_wait(group.replica_handles()[shard][0])
            seen = len(results)
            # the call in flight at the kill may have started before it; the next one surely did not
            _wait_for(lambda seen=seen: len(results) >= seen + 2, f"two answers after shard {shard}'s kill")
    finally:
        stop.set()
        worker.join(timeout=60)
    try:
        _, ids = _flat_reference(vectors, queries, 5)
        assert not [r for r in results if isinstance(r, Exception)]
        assert all(r.coverage == 1.0 and np.array_equal(r.ids, ids) for r in results)
        _wait_for(
            lambda: all(r["state"] == "ready" for row in group.health()["shards"] for r in row),
            "both killed replicas to be restarted",
        )
    finally:
        group.close()


def test_only_replica_killed_gives_partial_then_full(ray_session, tmp_path: Path, data) -> None:
    vectors, queries = data
    build_index_from_vectors(vectors, _passages(len(vectors), "a"), tmp_path, shards=2)
    group = ShardGroup(_config(tmp_path, replicas=1))
    try:
        _kill_and_wait(group.replica_handles()[1][0])
        partial = group.search(queries, 5)
        assert partial.coverage == 0.5 and (partial.ids < 1500).all()  # only shard 0 (ids 0..1499) answered
        deadline = time.monotonic() + 60
        while (result := group.search(queries, 5)).coverage < 1.0:
            assert time.monotonic() < deadline, "the shard was not restarted"
            time.sleep(0.2)
        np.testing.assert_array_equal(result.ids, _flat_reference(vectors, queries, 5)[1])
        group.config.allow_partial = False
        _kill_and_wait(group.replica_handles()[0][0])
        with pytest.raises(ShardUnavailableError, match=r"shards \[0\]"):
            group.search(queries, 5)
    finally:
        group.close()


def test_health_sees_a_killed_replica_without_a_search(ray_session, tmp_path: Path, data) -> None:
    """Ready replicas are health-probed, so a replica that dies between searches shows as dead."""
    vectors, _ = data
    build_index_from_vectors(vectors, _passages(len(vectors), "a"), tmp_path, shards=2)
    group = ShardGroup(_config(tmp_path, replicas=1, restart_backoff_s=600))  # no restart in the test
    try:
        assert group.health()["coverage"] == 1.0
        _kill_and_wait(group.replica_handles()[1][0])
        _wait_for(lambda: group.health()["coverage"] == 0.5, "health() to see the dead replica")
        assert [row[0]["state"] for row in group.health()["shards"]] == ["ready", "dead"]
    finally:
        group.close()


def test_swap_under_load_and_refusals(ray_session, tmp_path: Path, data) -> None:
    vectors, queries = data
    old = build_index_from_vectors(vectors, _passages(len(vectors), "old"), tmp_path, shards=2)
    new = build_index_from_vectors(vectors[::-1].copy(), _passages(len(vectors), "new"), tmp_path, shards=2)
    group = ShardGroup(_config(tmp_path), version=old)
    stop, results = threading.Event(), []
    worker = threading.Thread(target=_stream, args=(group, queries, stop, results))
    worker.start()
    try:
        _wait_for(lambda: len(results) >= 1, "an answer before the swap")
        group.swap(new)
        after = group.search(queries, 5)
        _wait_for(lambda: any(getattr(r, "version", None) == new for r in results), "a streamed v2 answer")
    finally:
        stop.set()
        worker.join(timeout=60)
    try:
        assert not [r for r in results if isinstance(r, Exception)]
        for result in results:  # every answer is wholly one version
            tag = "old" if result.version == old else "new"
            assert all(t.startswith(f"{tag}-") for row in result.titles for t in row), result.titles
        assert {r.version for r in results} == {old, new}
        _, ids = _flat_reference(vectors[::-1].copy(), queries, 5)
        assert (
            after.version == new and np.array_equal(after.ids, ids) and after.titles[0][0].startswith("new-")
        )
        _check_refusals(group, tmp_path, vectors, queries, new)
    finally:
        group.close()


def _check_refusals(
    group: ShardGroup, root: Path, vectors: np.ndarray, queries: np.ndarray, serving: str
) -> None:
    """Corrupt, missing-shard and wrong-dim versions are refused; the serving version keeps answering."""
    corrupt = build_index_from_vectors(vectors, _passages(len(vectors), "bad"), root, shards=2)
    path = version_dir(root, corrupt) / load_manifest(root, corrupt).shards[1].files["index"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{corrupt}.*refused.*checksum mismatch"):
        group.swap(corrupt)
    missing = build_index_from_vectors(vectors, _passages(len(vectors), "bad"), root, shards=2)
    (version_dir(root, missing) / load_manifest(root, missing).shards[0].files["ids"]).unlink()
    with pytest.raises(ValueError, match="missing"):
        group.swap(missing)
    narrow = build_index_from_vectors(vectors[:, :16].copy(), _passages(len(vectors), "bad"), root, shards=2)
    with pytest.raises(ValueError, match="dim 16"):
        group.swap(narrow)
    with pytest.raises(ValueError, match="v0099"):
        group.swap("v0099")
    result = group.search(queries, 5)
    assert result.version == serving and result.coverage == 1.0 and result.titles[0][0].startswith("new-")
    assert group.health()["version"] == serving


def test_bad_queries(ray_session, tmp_path: Path, data) -> None:
    vectors, queries = data
    build_index_from_vectors(vectors[:100], _passages(100, "a"), tmp_path)
    group = ShardGroup(_config(tmp_path))
    try:
        with pytest.raises(ValueError, match="float64"):
            group.search(queries.astype(np.float64), 5)
        with pytest.raises(ValueError, match=r"\(40, 16\)"):
            group.search(queries[:, :16].copy(), 5)
        for k in (0, -2):
            with pytest.raises(ValueError, match=f"k must be a positive int, got {k}"):
                group.search(queries, k)
    finally:
        group.close()
    with pytest.raises(ValueError, match="not an index root"):
        ShardGroup(ShardGroupConfig(index_root=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="replicas"):
        ShardGroupConfig(index_root=str(tmp_path), replicas=0)
