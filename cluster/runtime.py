"""Joining Ray for `rayrag`: the cluster at an address or $RAY_ADDRESS, else a local Ray on loopback."""

from __future__ import annotations

import logging
import os

# Workers read models from local paths or packages only, never from a hub.
WORKER_ENV = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
# Local Ray has no dashboard, so no State API: Ray Train's placement-group cleaner then warns every
# second, and its preemption watcher (idle on one node) logs a core_worker error; users read failures.
NO_PREEMPTION_WATCHER = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
NO_STATE_API_WARNING = "Failed to query Ray Train Controller actor state"


def keep_record(record: logging.LogRecord) -> bool:
    """False only for the cleaner's 'State API unavailable' warning."""
    return not record.getMessage().startswith(NO_STATE_API_WARNING)


def quiet_pg_cleaner() -> None:
    """Worker setup hook: drop that one warning from the cleaner's logger, nothing else."""
    logging.getLogger(PG_CLEANER_LOGGER).addFilter(keep_record)


def local_runtime_env() -> dict:
    """A fresh runtime_env for a local Ray (ray.init rewrites the dict it is given)."""
    return {
        "env_vars": WORKER_ENV["env_vars"] | NO_PREEMPTION_WATCHER,
        "worker_process_setup_hook": quiet_pg_cleaner,
    }


def init_ray(address: str | None = None, log_to_driver: bool = True) -> None:
    """Connect to `address` (or $RAY_ADDRESS); without one, start a local Ray bound to 127.0.0.1."""
    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=WORKER_ENV)
    else:
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=log_to_driver,
            runtime_env=local_runtime_env(),
        )
