"""Global batches and per-worker shares: every example once per epoch, shares partition the batch."""
from __future__ import annotations

import pytest

from training.loop import global_batch, local_slice


def test_global_batches_walk_seeded_epochs():
    steps = [global_batch(10, step, 4, seed=3) for step in range(5)]  # 20 positions = 2 epochs
    flat = [i for batch in steps for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation each epoch
    assert steps == [global_batch(10, step, 4, seed=3) for step in range(5)]


@pytest.mark.parametrize("size, world", [(8, 2), (5, 2), (7, 3), (2, 2)])
def test_local_slices_partition_the_batch(size, world):
    batch = list(range(100, 100 + size))
    shares = [local_slice(batch, rank, world) for rank in range(world)]
    assert [i for share in shares for i in share] == batch
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # the loop's loss weights make DDP's average of weighted local means the global mean
    weighted = [len(s) * world / size * sum(s) / len(s) for s in shares if s]
    assert sum(weighted) / world == pytest.approx(sum(batch) / size)
