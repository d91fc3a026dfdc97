"""Joining Ray for `rayrag`: the cluster at an address or $RAY_ADDRESS, else a local Ray on loopback."""

from __future__ import annotations

import os

# Workers read models from local paths or packages only, never from a hub.
WORKER_ENV = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}


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
            runtime_env=WORKER_ENV,
        )
