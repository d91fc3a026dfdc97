"""The Serve app's metrics in Ray's metrics API (Prometheus: `ray_` + name, at each node's metrics
export port): requests and latency per route, stage and status; requests held per replica."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from cluster.metrics import MS_BOUNDARIES

REQUESTS = Counter(
    "rayrag_requests_total",
    description="HTTP requests answered, by route and status code.",
    tag_keys=("route", "status"),
)
LATENCY_MS = Histogram(
    "rayrag_request_latency_ms",
    description="Latency by route and stage (retrieve, generate, total) and status (ms).",
    boundaries=MS_BOUNDARIES,
    tag_keys=("route", "stage", "status"),
)
IN_FLIGHT = Gauge(
    "rayrag_in_flight_requests",
    description="Requests a replica holds, queued or being worked on.",
    tag_keys=("deployment",),
)
QUEUED = Gauge(
    "rayrag_queued_requests",
    description="Requests a replica holds that wait for their batch to start.",
    tag_keys=("deployment",),
)
