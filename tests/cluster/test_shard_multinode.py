"""A two-node Ray cluster (ray.cluster_utils.Cluster, in a subprocess) gets shards on both nodes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.cluster_script import run_cluster_script

pytestmark = pytest.mark.slow  # see pyproject.toml: `pytest -m "not slow"` skips it

SCRIPT = textwrap.dedent("""
    import json, signal, sys
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

    from cluster.index_build import build_index_from_vectors
    from cluster.passages import Passage
    from cluster.shard_group import ShardGroup, ShardGroupConfig

    def give_up(signum, frame):
        raise TimeoutError("two-node test ran out of time")

    signal.signal(signal.SIGALRM, give_up)  # raise inside the try below, so the cluster is shut down
    signal.alarm(150)
    root = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 2, "include_dashboard": False})
    cluster.add_node(node_ip_address="127.0.0.1", num_cpus=2)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        vectors = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
        build_index_from_vectors(vectors, [Passage(i, "t", f"p{i}") for i in range(200)], root, shards=2)
        group = ShardGroup(ShardGroupConfig(index_root=root, replicas=2, shard_cpus=0.5))
        result = group.search(vectors[:3], 4)
        reference = faiss.IndexFlatIP(8)
        reference.add(vectors)
        nodes = [[r["node_id"] for r in row] for row in group.health()["shards"]]
        print(json.dumps({"nodes": nodes, "cluster_nodes": len(ray.nodes()), "coverage": result.coverage,
                          "ids_equal": bool(np.array_equal(reference.search(vectors[:3], 4)[1],
                                                            result.ids))}))
        group.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_shards_spread_over_two_nodes(tmp_path: Path) -> None:
    report = run_cluster_script(tmp_path, SCRIPT, str(tmp_path / "index"), timeout=200)
    assert report["cluster_nodes"] == 2 and report["coverage"] == 1.0 and report["ids_equal"]
    placed = {node for row in report["nodes"] for node in row}
    assert len(placed) == 2, report  # 2 shards × 2 replicas, SPREAD over both nodes
