"""The shared retrieval path against a brute-force search: doc scores, per-question views, batches."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.fusion import RetrievalConfig
from cluster.merge import SearchResult
from services.rag.retrieval import Retrieved, retrieve

SCALE = 20.0


class TableEncoder:
    """Encodes the question "i" as row i of a fixed table."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.table[[int(t) for t in texts]]  # (B, d)


def brute_search(vectors: np.ndarray, version: str = "v0001"):
    """Exact top-k over the (N, d) vectors, padded with -1 slots when k > N, as a ShardGroup answers;
    its "bm25" part scores passage i for question q as (i + q) % 4 (0: no hit)."""

    def top(scores: np.ndarray, k: int) -> SearchResult:
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (B, k')
        hit = np.take_along_axis(scores, order, axis=1) > -np.inf  # (B, k')
        order = np.where(hit, order, -1)
        pad = k - order.shape[1]
        ids = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)  # (B, k)
        top = np.pad(np.take_along_axis(scores, np.maximum(order, 0), axis=1), ((0, 0), (0, pad)))  # (B, k)
        found = np.where(ids[:, :, None] >= 0, vectors[np.maximum(ids, 0)], 0)  # (B, k, d) zeros when empty
        return SearchResult(
            scores=top.astype(np.float32),
            ids=ids,
            titles=[[f"t{i}" if i >= 0 else "" for i in row] for row in ids],
            texts=[[f"x{i}" if i >= 0 else "" for i in row] for row in ids],
            vectors=found.astype(np.float32),
            version=version,
            coverage=0.5,
        )

    def search(queries: np.ndarray, questions: list[str], k: int, parts: tuple[str, ...]) -> dict:
        lexical = (np.arange(len(vectors))[None, :] + np.array([[int(q)] for q in questions])) % 4  # (B, N)
        scores = {"dense": queries @ vectors.T, "bm25": np.where(lexical > 0, lexical, -np.inf)}
        return {name: top(scores[name], k) for name in parts}

    return search


@pytest.fixture
def setup() -> tuple[TableEncoder, np.ndarray]:
    rng = np.random.default_rng(0)
    return TableEncoder(rng.standard_normal((4, 6)).astype(np.float32)), rng.standard_normal((5, 6)).astype(
        np.float32
    )


def test_doc_scores_are_scaled_inner_products_of_the_hits(setup) -> None:
    encoder, vectors = setup
    found = retrieve(encoder, brute_search(vectors), ["0", "1", "2"], 3, SCALE)
    brute = encoder.table[:3] @ vectors.T  # (B, N)
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :3]  # (B, 3)
    np.testing.assert_array_equal(found.ids, expected)
    assert found.titles == [[f"t{i}" for i in row] for row in expected]
    np.testing.assert_allclose(
        found.doc_scores, SCALE * np.take_along_axis(brute, expected, axis=1), atol=1e-4
    )
    np.testing.assert_allclose(found.doc_scores, SCALE * found.scores, atol=1e-4)
    assert (found.version, found.coverage, found.vectors) == ("v0001", 0.5, None)
    kept = retrieve(encoder, brute_search(vectors), ["3"], 2, SCALE, keep_vectors=True)
    np.testing.assert_array_equal(kept.vectors, vectors[kept.ids])  # (1, 2, d)


def test_for_question_keeps_its_first_k_hits_and_drops_empty_slots(setup) -> None:
    encoder, vectors = setup
    found = retrieve(
        encoder, brute_search(vectors), ["0", "1"], 7, SCALE, keep_vectors=True
    )  # 5 passages: 2 empty
    assert (found.ids[:, 5:] == -1).all()
    one = found.for_question(1, 7)
    np.testing.assert_array_equal(one.ids, found.ids[1:2, :5])
    assert one.titles == [found.titles[1][:5]] and one.texts == [found.texts[1][:5]]
    np.testing.assert_array_equal(one.doc_scores, found.doc_scores[1:2, :5])
    np.testing.assert_array_equal(one.vectors, found.vectors[1:2, :5])
    first_two = found.for_question(0, 2)
    np.testing.assert_array_equal(first_two.ids, found.ids[:1, :2])
    np.testing.assert_array_equal(first_two.scores, found.scores[:1, :2])
    assert (first_two.version, first_two.coverage) == (found.version, found.coverage)


def test_concat_joins_batches_of_one_version(setup) -> None:
    encoder, vectors = setup
    parts = [
        retrieve(encoder, brute_search(vectors), q, 2, SCALE, keep_vectors=True) for q in (["0", "1"], ["2"])
    ]
    joined = Retrieved.concat(parts)
    whole = retrieve(encoder, brute_search(vectors), ["0", "1", "2"], 2, SCALE, keep_vectors=True)
    np.testing.assert_array_equal(joined.ids, whole.ids)
    np.testing.assert_array_equal(joined.vectors, whole.vectors)
    np.testing.assert_allclose(joined.doc_scores, whole.doc_scores, atol=1e-5)
    assert joined.titles == whole.titles and joined.texts == whole.texts and joined.version == "v0001"
    assert joined.retrieve_ms == pytest.approx(sum(p.retrieve_ms for p in parts))
    other = retrieve(encoder, brute_search(vectors, version="v0002"), ["3"], 2, SCALE)
    with pytest.raises(ValueError, match=r"\['v0001', 'v0002'\]"):
        Retrieved.concat([*parts, other])


def test_bm25_doc_scores_are_its_scores_over_the_temperature(setup) -> None:
    encoder, vectors = setup
    config = RetrievalConfig(retriever="bm25", bm25_temperature=2.0)
    found = retrieve(encoder, brute_search(vectors), ["0", "1"], 5, SCALE, retrieval=config)
    assert found.ids[0].tolist() == [3, 2, 1, -1, -1]  # (i + 0) % 4: passages 3, 2, 1 then 0 and 4 score 0
    np.testing.assert_array_equal(found.doc_scores[0], [1.5, 1.0, 0.5, 0.0, 0.0])
    assert found.found_by[0].tolist() == ["bm25", "bm25", "bm25", "", ""] and found.retriever == "bm25"
    one = found.for_question(0, 5)
    assert one.ids.shape == (1, 3) and one.part_scores["bm25"].tolist() == [[3.0, 2.0, 1.0]]


def test_hybrid_fuses_both_parts_and_weighs_them_by_the_dense_score(setup) -> None:
    encoder, vectors = setup
    config = RetrievalConfig(retriever="hybrid", fusion="rrf", candidates=4)
    found = retrieve(
        encoder, brute_search(vectors), ["0", "2"], 3, SCALE, keep_vectors=True, retrieval=config
    )
    np.testing.assert_array_equal(found.vectors, vectors[found.ids])  # every fused passage's own vector
    dense = np.einsum("bd,bkd->bk", encoder.table[[0, 2]], vectors[found.ids])  # (B, K)
    np.testing.assert_allclose(found.doc_scores, SCALE * dense, atol=1e-4)
    assert set(found.found_by.ravel()) <= {"dense", "bm25", "dense+bm25"}
    assert (found.scores < 1).all()  # RRF values, not similarities
    both = found.found_by == "dense+bm25"
    assert not np.isnan(found.part_scores["dense"][both]).any()
