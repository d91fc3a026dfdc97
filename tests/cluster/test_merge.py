"""merge_topk and merge_hits against a brute-force global sort over the concatenated shard lists."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.merge import MISSING_SCORE, merge_hits, merge_topk
from cluster.shard import ShardHits


def _split_topk(scores: np.ndarray, parts: int, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-part top-k of a (B, N) score matrix, with global ids."""
    out_scores, out_ids = [], []
    for chunk in np.array_split(np.arange(scores.shape[1]), parts):
        local = scores[:, chunk]  # (B, n)
        order = np.argsort(-local, axis=1)[:, :k]  # (B, k')
        out_scores.append(np.take_along_axis(local, order, axis=1))
        out_ids.append(chunk[order])
    return out_scores, out_ids


@pytest.mark.parametrize("parts,k", [(1, 5), (2, 7), (3, 1), (3, 20), (4, 40)])
def test_merge_matches_global_sort(parts: int, k: int) -> None:
    scores = np.random.default_rng(parts).standard_normal((6, 37)).astype(np.float32)  # (B, N)
    shard_scores, shard_ids = _split_topk(scores, parts, k)
    merged_scores, merged_ids, part, column = merge_topk(shard_scores, shard_ids, k)
    expected = np.argsort(-scores, axis=1)[:, :k]  # (B, min(k, N))
    width = expected.shape[1]
    np.testing.assert_array_equal(merged_ids[:, :width], expected)
    np.testing.assert_allclose(merged_scores[:, :width], np.take_along_axis(scores, expected, 1))
    assert (merged_ids[:, width:] == -1).all() and (merged_scores[:, width:] == MISSING_SCORE).all()
    assert (part[:, width:] == -1).all() and (column[:, width:] == -1).all()
    dtypes = [a.dtype for a in (merged_scores, merged_ids, part, column)]
    assert dtypes == [np.float32, np.int64, np.int64, np.int64]
    for b in range(scores.shape[0]):  # part/column point back at the winning entry
        for slot in range(width):
            assert shard_ids[part[b, slot]][b, column[b, slot]] == merged_ids[b, slot]


def test_missing_hits_are_skipped() -> None:
    scores = [np.array([[0.9, 0.1]], np.float32), np.array([[0.5, 99.0]], np.float32)]
    ids = [np.array([[3, 4]]), np.array([[7, -1]])]  # -1: empty slot, its score must not win
    merged_scores, merged_ids, part, column = merge_topk(scores, ids, 4)
    np.testing.assert_array_equal(merged_ids, [[3, 7, 4, -1]])
    np.testing.assert_array_equal(merged_scores, np.array([[0.9, 0.5, 0.1, MISSING_SCORE]], np.float32))
    np.testing.assert_array_equal(part, [[0, 1, 0, -1]])
    np.testing.assert_array_equal(column, [[0, 0, 1, -1]])


def test_mismatched_lists_are_rejected() -> None:
    one = np.zeros((1, 1), np.float32)
    with pytest.raises(ValueError, match="got 2 and 1"):
        merge_topk([one, one], [one.astype(np.int64)], 1)
    with pytest.raises(ValueError, match="got 0 and 0"):
        merge_topk([], [], 1)


@pytest.mark.parametrize("k", [0, -3])
def test_bad_k(k: int) -> None:
    with pytest.raises(ValueError, match=str(k)):
        merge_topk([np.zeros((1, 1), np.float32)], [np.zeros((1, 1), np.int64)], k)


def _shard_hits(
    vectors: np.ndarray, scores: np.ndarray, parts: int, k: int, version: str = "v0001"
) -> list[ShardHits]:
    """Each part's top-k by the (B, N) scores, with the payload of the (N, d) vectors, as a shard answers."""
    hits = []
    for shard, chunk in enumerate(np.array_split(np.arange(len(vectors)), parts)):
        local = scores[:, chunk]  # (B, n)
        order = np.argsort(-local, axis=1, kind="stable")[:, :k]  # (B, k')
        ids = chunk[order]  # (B, k')
        hits.append(
            ShardHits(
                scores=np.take_along_axis(local, order, axis=1),
                ids=ids,
                titles=[[f"t{i}" for i in row] for row in ids],
                texts=[[f"x{i}" for i in row] for row in ids],
                vectors=vectors[ids],
                version=version,
                shard=shard,
                search_ms=0.0,
            )
        )
    return hits


@pytest.mark.parametrize("parts,k", [(1, 4), (3, 6), (4, 30)])
def test_merge_hits_matches_brute_force_with_payloads(parts: int, k: int) -> None:
    rng = np.random.default_rng(k)
    vectors = rng.standard_normal((25, 8)).astype(np.float32)  # (N, d)
    queries = rng.standard_normal((5, 8)).astype(np.float32)  # (B, d)
    brute = queries @ vectors.T  # (B, N)
    result = merge_hits(_shard_hits(vectors, brute, parts, k), k, coverage=1.0, return_vectors=True)
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :k]  # (B, min(k, N))
    width = expected.shape[1]
    np.testing.assert_array_equal(result.ids[:, :width], expected)
    np.testing.assert_array_equal(result.scores[:, :width], np.take_along_axis(brute, expected, axis=1))
    np.testing.assert_array_equal(result.vectors[:, :width], vectors[expected])
    assert result.titles == [[f"t{i}" for i in row] + [""] * (k - width) for row in expected]
    assert result.texts == [[f"x{i}" for i in row] + [""] * (k - width) for row in expected]
    assert (result.ids[:, width:] == -1).all() and (result.vectors[:, width:] == 0).all()
    assert (result.version, result.coverage) == ("v0001", 1.0)
    assert merge_hits(_shard_hits(vectors, brute, parts, k), k, 0.5, return_vectors=False).vectors is None


def test_merge_hits_refuses_mixed_versions() -> None:
    vectors = np.eye(4, dtype=np.float32)  # (N, d), also the (B, N) scores of 4 one-hot queries
    mixed = _shard_hits(vectors, vectors, 2, 2)[:1] + _shard_hits(vectors, vectors, 2, 2, version="v0002")[1:]
    with pytest.raises(ValueError, match=r"\['v0001', 'v0002'\]"):
        merge_hits(mixed, 2, coverage=1.0, return_vectors=False)
