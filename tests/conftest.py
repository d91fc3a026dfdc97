"""Shared fixtures (one Ray per test session, bound to loopback) and the order files run in."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Ray Train controller polls its workers every 2 s by default: a finished run, a queued checkpoint
# report or a dead worker waits up to that long to be seen, a few times per tiny run. Ray Train passes
# the variable on from this process to its controller. A missed poll is no failure: the controller
# waits on it again (a worker is declared dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# Files whose tests share no start-up beyond the session's: `make test` spreads them one test at a
# time over the workers (every other file runs whole on one worker, its module fixtures paid once).
PER_TEST_FILES = ("tests/cluster/test_stream_build.py", "tests/training/test_train_ray.py")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts Ray (through `ray_session`) is slow. Files holding slow tests go first, each
    file's tests kept together and in order: under `pytest -n N --no-loadscope-reorder` (make test)
    the long start-ups begin first and overlap."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under pytest-xdist: one work unit per file, but one per test in PER_TEST_FILES."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path in PER_TEST_FILES else path

    return FileScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def shard_cache(tmp_path_factory: pytest.TempPathFactory):
    """Shard actors and in-process shards cache and mark files here, not under the home directory."""
    from cluster.shard_cache import CACHE_ENV

    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("shard-cache"))
    yield
    os.environ.pop(CACHE_ENV, None)


@pytest.fixture(scope="session")
def ray_session():
    """A new local Ray per session (one per xdist worker; loopback only); shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join another Ray on the machine (RAY_ADDRESS, `ray start`)
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
