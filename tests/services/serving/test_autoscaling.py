"""Serve autoscaling of the Generator over real HTTP on 127.0.0.1: 1 → 2 replicas under load, back to 1."""

from __future__ import annotations

import pytest

from cluster.passages import Passage
from tests.serve_load import FAST_AUTOSCALING, Load, latency_stats, measure_autoscaling

pytestmark = [
    pytest.mark.slow,  # see pyproject.toml: `pytest -m "not slow"` skips it
    # Ray 2.60 warns that the field will give way to environment variables it does not read yet.
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning"),
]

APP = "rayrag-autoscaling"
CORPUS = [Passage(id=i, title=f"Item {i}", text=f"Item {i} is kept in room {i % 7}.") for i in range(32)]
# Beams and tokens so that the Generator holds the requests in flight.
BODY = {"n_docs": 4, "num_beams": 2, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def url(serve_url, tmp_path_factory):
    """Tiny models over a 2-shard index; the Generator autoscaled from 1 to 2 replicas of 0.25 CPU."""
    from ray import serve

    from cluster.index_build import build_index
    from services.serving.app import build_app
    from tests.tiny_models import save_tiny_encoder, save_tiny_generator

    tmp = tmp_path_factory.mktemp("autoscaling")
    encoder = save_tiny_encoder(tmp / "encoder")
    # one encoder actor for the 2 batches, not one per batch: each is a process start-up
    build_index(CORPUS, tmp / "index", encoder=encoder, shards=2, num_encoders=1, show_progress=False)
    args = {
        "index": {"root": str(tmp / "index"), "follow_s": 0, "shard_cpus": 0.1},
        "models": {"query_encoder": encoder, "generator": save_tiny_generator(tmp / "generator")},
        "retriever": {"num_cpus": 0.25},
        "generator": {"num_cpus": 0.25, "autoscaling_config": FAST_AUTOSCALING},
    }
    serve.run(build_app(args), name=APP, route_prefix="/")
    yield serve_url
    serve.delete(APP)


def test_generator_scales_up_under_load_and_back_down_after(url):
    """measure_autoscaling raises unless Serve goes 1 → 2 RUNNING replicas under the load and back to
    exactly 1 after it, each within the deadline; no request fails meanwhile."""
    questions = [f"Where is item {i} kept?" for i in range(len(CORPUS))]
    scaled = measure_autoscaling(
        APP, lambda: Load(url, questions, BODY, concurrency=8, max_requests=20_000, max_s=180), timeout_s=180
    )
    stats = latency_stats(scaled.outcomes)
    assert stats["failed"] == 0, stats
