"""What a deployment replica takes from Ray and Serve: its threads and its batching settings."""

from __future__ import annotations

from typing import Any

from services.serving.config import BatchConfig


def reserved_threads(configured: int | None) -> int:
    """`configured`, else the CPUs Ray reserved for this replica rounded up (1 outside a Ray worker)."""
    if configured is not None:
        return configured
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return 1
    return max(1, -int(-ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0) // 1))


def set_batching(method: Any, batch: BatchConfig) -> None:
    method.set_max_batch_size(batch.max_batch_size)
    method.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)
