"""merge_topk against a brute-force global sort over the concatenated shard lists."""
from __future__ import annotations

import numpy as np
import pytest

from cluster.merge import MISSING_SCORE, merge_topk


def _split_topk(scores: np.ndarray, parts: int, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-part top-k of a (B, N) score matrix, with global ids."""
    out_scores, out_ids = [], []
    for chunk in np.array_split(np.arange(scores.shape[1]), parts):
        local = scores[:, chunk]  # (B, n)
        order = np.argsort(-local, axis=1)[:, :k]  # (B, k')
        out_scores.append(np.take_along_axis(local, order, axis=1))
        out_ids.append(chunk[order])
    return out_scores, out_ids


@pytest.mark.parametrize("parts,k", [(1, 5), (2, 7), (3, 20), (4, 40)])
def test_merge_matches_global_sort(parts: int, k: int) -> None:
    scores = np.random.default_rng(parts).standard_normal((6, 37)).astype(np.float32)  # (B, N)
    shard_scores, shard_ids = _split_topk(scores, parts, k)
    merged_scores, merged_ids, part, column = merge_topk(shard_scores, shard_ids, k)
    expected = np.argsort(-scores, axis=1)[:, :k]  # (B, min(k, N))
    width = expected.shape[1]
    np.testing.assert_array_equal(merged_ids[:, :width], expected)
    np.testing.assert_allclose(merged_scores[:, :width], np.take_along_axis(scores, expected, 1))
    assert (merged_ids[:, width:] == -1).all() and (merged_scores[:, width:] == MISSING_SCORE).all()
    for b in range(scores.shape[0]):  # part/column point back at the winning entry
        for slot in range(width):
            assert shard_ids[part[b, slot]][b, column[b, slot]] == merged_ids[b, slot]


def test_missing_hits_are_skipped() -> None:
    scores = [np.array([[0.9, 0.1]], np.float32), np.array([[0.5, 99.0]], np.float32)]
    ids = [np.array([[3, 4]]), np.array([[7, -1]])]  # -1: empty slot, its score must not win
    merged_scores, merged_ids, _, _ = merge_topk(scores, ids, 4)
    np.testing.assert_array_equal(merged_ids, [[3, 7, 4, -1]])
    np.testing.assert_allclose(merged_scores[0, :3], [0.9, 0.5, 0.1])


@pytest.mark.parametrize("k", [0, -3])
def test_bad_k(k: int) -> None:
    with pytest.raises(ValueError, match=str(k)):
        merge_topk([np.zeros((1, 1), np.float32)], [np.zeros((1, 1), np.int64)], k)
