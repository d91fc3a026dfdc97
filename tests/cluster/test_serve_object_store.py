"""Three Ray nodes (ray.cluster_utils.Cluster, in a subprocess), each with its own shard cache, serve an
index whose root is on a local S3 server: placement, fetch-once, exact answers, failover under load,
and a swap to a version published there."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import pytest

from tests.cluster_script import run_cluster_script
from tests.s3_server import BUCKET, moto_server, s3_env

pytestmark = pytest.mark.slow  # see pyproject.toml: `pytest -m "not slow"` skips it

SCRIPT = textwrap.dedent("""
    import json, os, shutil, signal, sys, threading, time
    import faiss
    import numpy as np
    import ray
    import ray._common.utils
    import ray._private.services
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # keep other Ray users on this machine from auto-connecting to this throwaway cluster
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    ray._common.utils.reset_ray_address = lambda *args, **kwargs: None
    # the driver joins at 127.0.0.1 (Ray would rewrite a loopback address to the host's IP)
    ray._private.services.resolve_ip_for_localhost = lambda host: host

    from cluster import storage
    from cluster.index_build import build_index_from_vectors
    from cluster.index_store import (commit_version, list_versions, load_manifest, publish,
                                     published_version, staging_dir, version_dir, version_location)
    from cluster.passages import Passage
    from cluster.shard_cache import CACHE_ENV
    from cluster.shard_group import ShardGroup, ShardGroupConfig

    def give_up(signum, frame):
        raise TimeoutError("three-node test ran out of time")

    def mixture(n, dim, centres=16, seed=0):
        rng = np.random.default_rng(seed)
        means = rng.standard_normal((centres, dim))
        vectors = means[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, dim))
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    def to_object_store(local_root, root, vectors):
        local = build_index_from_vectors(vectors, [Passage(i, "t", f"p{i}") for i in range(len(vectors))],
                                         local_root, shards=3)
        staged = staging_dir(root)
        shutil.copytree(version_dir(local_root, local), staged, dirs_exist_ok=True)
        manifest = load_manifest(local_root, local)
        version = commit_version(root, staged, manifest)
        publish(root, version)
        half = version_location(root, "v%04d" % (int(version[1:]) + 1))  # a killed upload: no manifest
        for name in manifest.shards[0].files.values():
            storage.write_bytes(storage.join(half, name), b"partial")
        return version

    def replica_infos(group):
        return [ray.get([h.health.remote() for h in row]) for row in group.replica_handles()]

    def load_while(group, queries, reference, action, searches=40):
        \"\"\"`searches` sequential searches; `action` runs once the first quarter answered.\"\"\"
        outcomes, started = [], threading.Event()
        def run():
            for i in range(searches):
                if i == searches // 4:
                    started.set()
                try:
                    result = group.search(queries, 10)
                    outcomes.append([result.coverage, bool(np.array_equal(result.ids, reference))])
                except Exception as error:
                    outcomes.append(repr(error))
        worker = threading.Thread(target=run)
        worker.start()
        started.wait()
        action()
        worker.join()
        return outcomes

    def all_ready(group, timeout_s=60.0):
        deadline = time.monotonic() + timeout_s
        while any(r["state"] != "ready" for row in group.health()["shards"] for r in row):
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicas not ready: {group.health()}")
            time.sleep(0.1)

    signal.signal(signal.SIGALRM, give_up)  # raise inside the try below, so the cluster is shut down
    signal.alarm(240)
    root, local_root, caches = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 2, "include_dashboard": False,
        "env_vars": {CACHE_ENV: f"{caches}/node0"}})
    workers = [cluster.add_node(node_ip_address="127.0.0.1", num_cpus=2,
                                env_vars={CACHE_ENV: f"{caches}/node{i}"}) for i in (1, 2)]
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        vectors = mixture(3000, 32)
        version = to_object_store(local_root, root, vectors)
        options = dict(index_root=root, shard_cpus=0.25, call_timeout_s=10.0, restart_backoff_s=0.5)
        group = ShardGroup(ShardGroupConfig(replicas=2, **options))
        second = ShardGroup(ShardGroupConfig(replicas=1, **options))  # e.g. a second Retriever replica
        queries = vectors[:8] + 0.01
        flat = faiss.IndexFlatIP(32)
        flat.add(vectors)
        reference = flat.search(queries, 10)[1]
        result = group.search(queries, 10)
        infos = replica_infos(group)
        report = {
            "versions": list_versions(root), "served": group.version, "version": version,
            "coverage": result.coverage, "ids_equal": bool(np.array_equal(result.ids, reference)),
            "second_equal": bool(np.array_equal(second.search(queries, 10).ids, reference)),
            "nodes": [[i["node_id"] for i in row] for row in infos],
            "health_nodes": [[r["node_id"] for r in row] for row in group.health()["shards"]],
            "fetched": [[[i["node_id"], i["fetched"]] for i in row] for row in infos + replica_infos(second)],
            "files": [s.sha256 for s in load_manifest(root, version).shards],
        }
        nodes = [cluster.head_node] + workers
        cached = {n.node_id: os.listdir(f"{caches}/node{k}/sha256") for k, n in enumerate(nodes)}
        report["cached"] = {node: len(names) for node, names in cached.items()}
        victim = infos[0][0]["node_id"]
        def kill_victim_actors():
            for row, handles in zip(infos, group.replica_handles()):
                for info, handle in zip(row, handles):
                    if info["node_id"] == victim:
                        ray.kill(handle, no_restart=True)
        report["killed_actors"] = load_while(group, queries, reference, kill_victim_actors)
        all_ready(group)  # the restarted replicas serve again: now every shard has one on each of 2 nodes
        survivor = next(w for w in workers if w.node_id != victim)
        report["removed"] = survivor.node_id
        report["removed_node"] = load_while(group, queries, reference, lambda: cluster.remove_node(survivor))
        newer = to_object_store(local_root, root, vectors[::-1].copy())  # published past the half one
        flat.reset()
        flat.add(vectors[::-1].copy())
        group.swap(published_version(root))
        report["swapped"] = [newer, group.version, list_versions(root),
                             bool(np.array_equal(group.search(queries, 10).ids, flat.search(queries, 10)[1]))]
        print(json.dumps(report))
        group.close()
        second.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_three_nodes_serve_an_object_store_index(tmp_path: Path) -> None:
    with moto_server() as endpoint:
        args = (f"s3://{BUCKET}/served", str(tmp_path / "local"), str(tmp_path))
        report = run_cluster_script(tmp_path, SCRIPT, *args, timeout=300, env=s3_env(endpoint))
    # the half-uploaded v0002 is invisible; the published v0001 is served and answers as one flat index
    assert report["versions"] == [report["version"]] == [report["served"]]
    assert report["coverage"] == 1.0 and report["ids_equal"] and report["second_equal"]
    _check_placement(report["nodes"], report["health_nodes"], set(report["cached"]))
    _check_fetched_once(report)
    for phase in ("killed_actors", "removed_node"):
        outcomes = report[phase]
        assert len(outcomes) == 40 and all(isinstance(o, list) for o in outcomes), outcomes  # no error
        # every answer is whole and exact (the other node's replica served) or flagged partial
        assert all(equal or coverage < 1.0 for coverage, equal in outcomes), outcomes
    # a node removed while every shard had a ready replica on two nodes: no answer lost a shard
    removed = report["removed_node"]
    assert all(coverage == 1.0 and equal for coverage, equal in removed), removed
    # a version published to the object store is swapped in and answers exactly
    assert report["swapped"] == ["v0003", "v0003", ["v0001", "v0003"], True]


def _check_placement(nodes: list[list[str]], health_nodes: list[list[str]], cluster_nodes: set[str]) -> None:
    """3 shards × 2 replicas on 3 nodes: replicas of a shard on distinct nodes, 2 replicas per node."""
    assert nodes == health_nodes  # /healthz (the group's health) names each replica's node
    assert all(len(set(row)) == 2 for row in nodes), nodes
    assert Counter(node for row in nodes for node in row) == Counter(dict.fromkeys(cluster_nodes, 2))


def _check_fetched_once(report: dict) -> None:
    """Each node fetched (and verified) each file of the shards it hosts exactly once, into its own cache.

    Files are cached by checksum, so two shards' identical files (e.g. equal offsets) count once."""
    per_node: dict[str, Counter[str]] = {}
    hosted: dict[str, set[str]] = {}
    for row_number, row in enumerate(report["fetched"]):  # group 1's 3 rows, then group 2's
        sha = report["files"][row_number % 3]
        for node, fetched in row:
            per_node.setdefault(node, Counter()).update(sha[name] for name in fetched)
            hosted.setdefault(node, set()).update(sha.values())
    assert set(per_node) == set(report["cached"])
    for node, counts in per_node.items():
        assert set(counts) == hosted[node] and set(counts.values()) == {1}, (node, counts)
        assert report["cached"][node] == len(hosted[node]), (node, report["cached"])
