"""Hybrid fusion (no Ray): RRF and min-max against hand-written loops, provenance, one version only."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.fusion import RetrievalConfig, fuse
from cluster.merge import SearchResult


def _result(ids: list[list[int]], scores: list[list[float]], version: str = "v0001") -> SearchResult:
    ids_array = np.array(ids, np.int64)  # (B, N)
    vectors = np.where(ids_array[:, :, None] >= 0, ids_array[:, :, None], 0).astype(np.float32)  # (B, N, 1)
    return SearchResult(
        scores=np.array(scores, np.float32),
        ids=ids_array,
        titles=[[f"t{i}" for i in row] for row in ids],
        texts=[[f"x{i}" for i in row] for row in ids],
        vectors=vectors,
        version=version,
        coverage=1.0,
    )


DENSE = _result([[5, 3, 9, 1]], [[0.9, 0.8, 0.5, 0.1]])
BM25 = _result([[3, 7, 1, -1]], [[12.0, 6.0, 3.0, -1.0]])


def _rrf_loop(k_rrf: float) -> dict[int, float]:
    fused: dict[int, float] = {}
    for result in (DENSE, BM25):
        for rank, pid in enumerate(result.ids[0].tolist(), start=1):
            if pid >= 0:
                fused[pid] = fused.get(pid, 0.0) + 1.0 / (k_rrf + rank)
    return fused


def test_rrf_matches_the_formula_and_keeps_provenance() -> None:
    found = fuse(
        {"dense": DENSE, "bm25": BM25}, 4, RetrievalConfig(retriever="hybrid", fusion="rrf", rrf_k=60)
    )
    expected = _rrf_loop(60.0)
    order = sorted(expected, key=lambda pid: (-expected[pid], pid))[:4]
    assert found.ids[0].tolist() == order  # 3 (both lists), 1 (both), then 5, 7 by rank / id
    np.testing.assert_allclose(found.scores[0], [expected[pid] for pid in order], rtol=1e-6)
    assert found.found_by[0].tolist() == ["dense+bm25", "dense+bm25", "dense", "bm25"]
    np.testing.assert_array_equal(found.part_scores["bm25"][0], [12.0, 3.0, np.nan, 6.0])
    np.testing.assert_array_equal(
        found.part_scores["dense"][0], np.array([0.8, 0.1, 0.9, np.nan], np.float32)
    )
    assert found.titles[0] == [f"t{pid}" for pid in order]
    np.testing.assert_array_equal(found.vectors[0, :, 0], order)  # each passage's own vector


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_linear_mode_is_a_weighted_min_max_mix(alpha: float) -> None:
    config = RetrievalConfig(retriever="hybrid", fusion="linear", alpha=alpha)
    found = fuse({"dense": DENSE, "bm25": BM25}, 6, config)
    dense = {5: 1.0, 3: 0.875, 9: 0.5, 1: 0.0}  # (s - 0.1) / (0.9 - 0.1)
    bm25 = {3: 1.0, 7: 3 / 9, 1: 0.0}  # (s - 3) / (12 - 3)
    expected = {
        pid: alpha * dense.get(pid, 0.0) + (1 - alpha) * bm25.get(pid, 0.0) for pid in {*dense, *bm25}
    }
    order = sorted(expected, key=lambda pid: (-expected[pid], pid))
    assert found.ids[0, :5].tolist() == order and found.ids[0, 5] == -1
    np.testing.assert_allclose(found.scores[0, :5], [expected[pid] for pid in order], atol=1e-6)


def test_single_retrievers_pass_through_with_provenance() -> None:
    found = fuse({"bm25": BM25}, 4, RetrievalConfig(retriever="bm25"))
    np.testing.assert_array_equal(found.ids, BM25.ids)
    assert found.found_by[0].tolist() == ["bm25", "bm25", "bm25", ""]


def test_fusion_refuses_two_versions_and_bad_settings() -> None:
    with pytest.raises(ValueError, match="index versions"):
        fuse(
            {"dense": DENSE, "bm25": _result([[1]], [[1.0]], "v0002")}, 2, RetrievalConfig(retriever="hybrid")
        )
    with pytest.raises(ValueError, match="retriever"):
        RetrievalConfig.parse({"retriever": "sparse"})
    with pytest.raises(ValueError, match="alpha"):
        RetrievalConfig.parse({"alpha": 2})
