"""A three-node Ray cluster (ray.cluster_utils.Cluster, in a subprocess): one add task per shard,
and the shards' add tasks run on all three nodes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.cluster_script import run_cluster_script

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, signal, sys
    import ray
    import ray._common.utils
    import ray._private.services
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # keep other Ray users on this machine from auto-connecting to this throwaway cluster
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    ray._common.utils.reset_ray_address = lambda *args, **kwargs: None
    ray._private.services.resolve_ip_for_localhost = lambda host: host

    from cluster.stream_build import StreamBuildConfig, stream_build
    from cluster.synthetic import synthetic_passages

    def give_up(signum, frame):
        raise TimeoutError("three-node build ran out of time")

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(240)
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        config = StreamBuildConfig(index_root=sys.argv[1], shards=3, encoders=1, encoder_threads=1,
                                   show_progress=False, max_worker_memory="1GiB", recall_queries=100,
                                   encoder="synthetic:dim=16,clusters=8,spread=0.5,seed=0")
        report = stream_build(lambda: synthetic_passages(3000), config)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(json.dumps({"add_nodes": report.add_nodes, "nodes": nodes, "recall": report.recall_at_10}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_add_tasks_run_on_every_node(tmp_path: Path) -> None:
    report = run_cluster_script(tmp_path, SCRIPT, str(tmp_path / "index"), timeout=300)
    assert len(report["nodes"]) == 3 and len(report["add_nodes"]) == 3
    assert set(report["add_nodes"]) == set(report["nodes"]), report  # one shard's add task per node
    assert report["recall"] == 1.0  # Flat: exact
