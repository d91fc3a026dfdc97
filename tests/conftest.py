"""Shared fixtures: one Ray instance for the whole test session, bound to loopback."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def shard_cache(tmp_path_factory: pytest.TempPathFactory):
    """Shard actors and in-process shards cache and mark files here, not under the home directory."""
    from cluster.shard_cache import CACHE_ENV

    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("shard-cache"))
    yield
    os.environ.pop(CACHE_ENV, None)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray started once per session (loopback only); shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_root() -> str:
    """`s3://bucket` on a moto server on 127.0.0.1 (stopped at the end); the AWS variables point at it."""
    from tests.s3_server import BUCKET, moto_server, s3_env

    with moto_server() as endpoint:
        saved = {key: os.environ.get(key) for key in s3_env(endpoint)}
        os.environ.update(s3_env(endpoint))
        try:
            yield f"s3://{BUCKET}"
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
