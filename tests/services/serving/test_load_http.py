"""Load safety over real HTTP on 127.0.0.1: abandoned requests stop decoding, full queues answer
503, and the app's metrics reach Ray's Prometheus endpoint. The Generator runs SlowEngine (fakes.py),
whose work grows with the request as a real decoding does, so that stopping it shows."""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import urllib.request
from collections.abc import Callable

import httpx
import pytest

from cluster.passages import Passage
from tests.serve_load import wait_until
from tests.services.serving import fakes

pytestmark = pytest.mark.slow  # see pyproject.toml

APP = "rayrag-load"
IDLE = {"held": 0, "working": 0}
MAXIMAL = {"n_docs": 8, "num_beams": 8, "max_new_tokens": 64}  # 4096: the default work limit
CORPUS = [Passage(id=i, title=f"City {i}", text=f"City{i} lies on river{i % 7}.") for i in range(40)]


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    """Tiny encoder, a 2-shard index, SlowEngine behind a Generator of bounded queues, served at serve_url."""
    import ray
    from ray import serve

    from cluster.index_build import build_index
    from services.serving.app import build_app
    from tests.tiny_models import save_tiny_encoder

    ray.cloudpickle.register_pickle_by_value(fakes)  # Serve's workers cannot import tests/
    tmp = tmp_path_factory.mktemp("load")
    encoder = save_tiny_encoder(tmp / "encoder")
    # one encoder actor for the 3 batches, not one per batch: each is a process start-up
    build_index(CORPUS, tmp / "index", encoder=encoder, shards=2, num_encoders=1, show_progress=False)
    args = {
        "index": {"root": str(tmp / "index"), "follow_s": 0},
        "models": {"query_encoder": encoder, "generator": "slow"},
        "retriever": {"num_cpus": 0.25},
        "generator": {"num_cpus": 0.25, "max_ongoing_requests": 12, "max_queued_requests": 4},
        "limits": {"retry_after_s": 2},
    }
    serve.run(build_app(args, engine=fakes.SlowEngine), name=APP, route_prefix="/")
    generator = serve.get_deployment_handle("Generator", app_name=APP)
    with httpx.Client(base_url=serve_url, timeout=60) as client:
        yield {"client": client, "url": serve_url, "generator": generator}
    serve.delete(APP)


def _open_requests(url: str, body: dict, count: int) -> list[socket.socket]:
    """`count` requests sent on raw connections that are left open, unread."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    address = httpx.URL(url)
    connections = [socket.create_connection((address.host, address.port)) for _ in range(count)]
    for connection in connections:
        connection.sendall(head + payload)
    return connections


def _wait_load(generator, ready: Callable[[dict[str, int]], bool], timeout_s: float) -> float:
    """Seconds until the Generator's `load()` satisfies `ready`; TimeoutError past `timeout_s`."""
    return wait_until(lambda: ready(generator.load.remote().result()), timeout_s, "generator load", 0.05)


def test_abandoned_requests_stop_decoding_and_free_the_replica(app):
    client, generator = app["client"], app["generator"]
    normal = client.post("/v1/answer", json={"question": "river3"})
    assert normal.status_code == 200, normal.text
    usual_s = normal.json()["timings_ms"]["total"] / 1000
    clients = _open_requests(app["url"], {"question": "river5", **MAXIMAL}, count=8)
    # (load() takes one of the replica's 12 slots, so it answers while the 8 are held)
    _wait_load(generator, lambda load: load["held"] == 8 and load["working"] > 0, timeout_s=60)
    for connection in clients:  # the clients hang up
        connection.close()
    # Decoded to the end, the 8 requests would hold the replica for 8 × 1024 steps of 5 ms (41 s).
    assert _wait_load(generator, lambda load: load.items() >= IDLE.items(), timeout_s=5.0) < 5.0
    again = client.post("/v1/answer", json={"question": "river3"})
    assert again.status_code == 200 and again.json()["answer"] == normal.json()["answer"]
    assert again.json()["timings_ms"]["total"] / 1000 < 3 * usual_s + 2.0


def test_full_queues_answer_503_with_retry_after(app):
    """12 ongoing + 4 queued fit; of 24 concurrent maximal requests the rest are refused at once,
    as are those that the Generator sees could not finish within the deadline behind the others
    (about 5 s each), with the wait it estimates."""
    statuses = []

    def post(_: int) -> None:
        response = httpx.post(
            f"{app['url']}/v1/answer", json={"question": "river1", **MAXIMAL}, timeout=httpx.Timeout(3.0)
        )
        statuses.append(response.status_code)
        message = response.json()["error"]["message"] if response.status_code == 503 else ""
        if "at capacity" in message:
            assert response.headers["retry-after"] == "2"
        elif message:
            assert "the work queued ahead takes about" in message
            assert int(response.headers["retry-after"]) >= 5

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(lambda i: _quietly(post, i), range(24)))
    assert statuses.count(503) >= 24 - 16, statuses  # at most 12 ongoing + 4 queued wait
    assert all(o in ("ok", "ReadTimeout") for o in outcomes), outcomes
    _wait_load(app["generator"], lambda load: load.items() >= IDLE.items(), timeout_s=30.0)


def _quietly(post, i: int) -> str:
    try:
        post(i)
        return "ok"
    except httpx.ReadTimeout:
        return "ReadTimeout"


METRICS = [
    'ray_rayrag_requests_total{.*route="/v1/answer".*status="200"',
    'ray_rayrag_request_latency_ms_bucket{.*stage="generate"',
    'ray_rayrag_request_latency_ms_bucket{.*stage="retrieve"',
    'ray_rayrag_request_latency_ms_bucket{.*stage="total"',
    "ray_rayrag_shard_fanout_ms_bucket{",
    'ray_rayrag_index_coverage{.*version="v0001"',
    'ray_rayrag_index_version{.*version="v0001".* 1',
    'ray_rayrag_in_flight_requests{.*deployment="Generator"',
    'ray_rayrag_queued_requests{.*deployment="Generator"',
]


def test_metrics_reach_rays_prometheus_endpoint(app):
    import ray

    assert app["client"].post("/v1/answer", json={"question": "river2"}).status_code == 200
    port = ray._private.worker.global_worker.node.metrics_export_port
    missing = list(METRICS)

    def exported() -> bool:  # the metrics agent exports every few seconds
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        missing[:] = [m for m in METRICS if not re.search(m, text)]
        return not missing

    wait_until(exported, 60, "rayrag's metrics on Ray's Prometheus endpoint", poll_s=1)
    assert missing == []
