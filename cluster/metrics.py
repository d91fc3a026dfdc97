"""rayrag's metrics in Ray's metrics API, exported by every node's metrics agent to Prometheus
(`ray_` is prefixed to each name there). The index's are here; the Serve app's in services/serving."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

MS_BOUNDARIES = [1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]

FAN_OUT_MS = Histogram(
    "rayrag_shard_fanout_ms",
    description="One search over every shard of the index: fan-out, failover and merge (ms).",
    boundaries=MS_BOUNDARIES,
    tag_keys=("version",),
)
COVERAGE = Gauge(
    "rayrag_index_coverage",
    description="Fraction of the index's shards that answered the latest search.",
    tag_keys=("version",),
)
INDEX_VERSION = Gauge(
    "rayrag_index_version",
    description="1 for the index version in service, 0 for one swapped out.",
    tag_keys=("version",),
)
REPLICA_DEATHS = Counter(
    "rayrag_shard_replica_deaths_total",
    description="Shard replica actors found dead (by a failed call or a health probe).",
    tag_keys=("version", "shard"),
)
REPLICA_RESTARTS = Counter(
    "rayrag_shard_replica_restarts_total",
    description="Shard replica actors started in place of dead ones.",
    tag_keys=("version", "shard"),
)
REPLICA_UP = Gauge(
    "rayrag_shard_replica_up",
    description="1 for a shard replica serving on the node named by the `node` tag, 0 once it died.",
    tag_keys=("version", "shard", "node"),
)
