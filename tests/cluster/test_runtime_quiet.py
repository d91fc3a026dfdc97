"""init_ray quiets Ray Train's known-harmless local noise, and only that (no Ray is started)."""

from __future__ import annotations

import logging

import pytest
import ray

from cluster import runtime


@pytest.fixture
def init_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of each ray.init that init_ray makes."""
    calls: list[dict] = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    return calls


def test_local_ray_disables_watcher_and_installs_hook(init_calls):
    runtime.init_ray()
    runtime.init_ray()
    first, second = (call["runtime_env"] for call in init_calls)
    assert first["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert first["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert first["worker_process_setup_hook"] is runtime.quiet_pg_cleaner
    assert first["env_vars"] is not second["env_vars"]  # ray.init rewrites the dict it is given


def test_cluster_keeps_ray_defaults(init_calls):
    runtime.init_ray("ray://head:10001")
    assert init_calls[0]["runtime_env"] == runtime.WORKER_ENV
    assert "worker_process_setup_hook" not in init_calls[0]["runtime_env"]


def test_hook_drops_only_the_state_api_warning(caplog):
    runtime.quiet_pg_cleaner()
    log = logging.getLogger(runtime.PG_CLEANER_LOGGER)
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to query Ray Train Controller actor state. State API may be unavailable.")
        log.warning("Detected that the Ray Train controller actor (x) is dead.")
        logging.getLogger("ray.train").error("Failed to query Ray Train Controller actor state")
    assert [r.getMessage() for r in caplog.records] == [
        "Detected that the Ray Train controller actor (x) is dead.",
        "Failed to query Ray Train Controller actor state",
    ]
