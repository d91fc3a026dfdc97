"""Bench-only: the memory of a process from /proc, and shard replicas that report theirs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from cluster import replicas
from cluster.shard import Shard, ShardConfig


def read_smaps_rollup(pid: int) -> dict[str, int]:
    """A process's memory in bytes by /proc/PID/smaps_rollup field, plus "Uss" (its private pages)."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                values[parts[0].rstrip(":")] = int(parts[1]) * 1024
    values["Uss"] = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return values


class MeasuredShard(Shard):
    """A shard replica that notes its process's USS before loading the shard."""

    def __init__(self, config: ShardConfig) -> None:
        self.uss_at_start = read_smaps_rollup(os.getpid())["Uss"]
        super().__init__(config)

    def memory(self) -> dict[str, int]:
        """This process's memory now plus its USS before the shard loaded ("uss_at_start")."""
        return read_smaps_rollup(os.getpid()) | {"uss_at_start": self.uss_at_start}


@contextmanager
def measured_shards() -> Iterator[None]:
    """Shard groups made in this process meanwhile launch `MeasuredShard` replicas (`.memory.remote()`)."""
    launched = replicas.RemoteShard
    replicas.RemoteShard = ray.remote(MeasuredShard)
    try:
        yield
    finally:
        replicas.RemoteShard = launched
