"""Global batches and per-worker shares: every example once per epoch, shares partition the batch."""

from __future__ import annotations

import numpy as np
import pytest

from training.loop import global_batch, local_slice, share_weight


def _epoch_stream(num_examples: int, seed: int, epochs: int) -> list[int]:
    """The reference: epoch e's seeded permutation of every example, epochs laid end to end."""
    return np.concatenate(
        [np.random.default_rng(seed + e).permutation(num_examples) for e in range(epochs)]
    ).tolist()


@pytest.mark.parametrize("num_examples, batch_size", [(10, 4), (7, 3), (5, 5), (3, 8)])
def test_global_batches_cut_the_epoch_stream(num_examples, batch_size):
    steps = 6
    stream = _epoch_stream(num_examples, seed=3, epochs=steps * batch_size // num_examples + 1)
    for step in range(steps):
        assert (
            global_batch(num_examples, step, batch_size, seed=3)
            == stream[step * batch_size : (step + 1) * batch_size]
        ), step


def test_each_epoch_is_a_new_permutation():
    flat = [i for step in range(5) for i in global_batch(10, step, 4, seed=3)]  # 20 positions = 2 epochs
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert global_batch(10, 0, 4, seed=3) != global_batch(10, 0, 4, seed=4)


@pytest.mark.parametrize("size, world", [(8, 2), (5, 2), (7, 3), (2, 2), (1, 2), (10, 4)])
def test_local_slices_partition_the_batch(size, world):
    batch = list(range(100, 100 + size))
    shares = [local_slice(batch, rank, world) for rank in range(world)]
    assert [i for share in shares for i in share] == batch  # contiguous, in rank order, each once
    # balanced: size % world shares of ⌈size/world⌉, the rest of ⌊size/world⌋
    assert sorted(map(len, shares)) == sorted(size // world + (r < size % world) for r in range(world))


@pytest.mark.parametrize("size, world", [(8, 2), (5, 2), (7, 3), (1, 2)])
def test_share_weights_make_the_worker_average_the_global_mean(size, world):
    """DDP averages the workers' (weighted) mean losses; that average must be the global-batch mean."""
    losses = np.random.default_rng(0).random(size)
    shares = [local_slice(list(range(size)), rank, world) for rank in range(world)]
    weighted = [share_weight(len(s), world, size) * (losses[s].mean() if s else 0.0) for s in shares]
    assert np.mean(weighted) == pytest.approx(losses.mean(), rel=1e-12)
