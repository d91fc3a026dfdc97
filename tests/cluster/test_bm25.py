"""BM25 beside the dense index (no Ray): S shards merge to one index's answer, brute force, bm25s, files."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import bm25s
import numpy as np
import pytest

from cluster.bm25 import Bm25Params, query_tokens, tokenize, top_rows
from cluster.index_build import build_index_from_vectors
from cluster.index_store import load_manifest, version_dir
from cluster.merge import merge_hits
from cluster.passages import Passage, passage_text
from cluster.shard import Shard, ShardConfig

WORDS = "river paris seine rhine london thames city bridge flows north sea island king queen war".split()
QUERIES = [
    "Which river flows through Paris?",
    "the king and the queen",
    "sea island bridges",
    "zzz unknown",
    "war",
]


@pytest.fixture(scope="module")
def corpus() -> list[Passage]:
    rng = np.random.default_rng(3)
    weights = 1.0 / np.arange(1, len(WORDS) + 1)  # Zipf-like: frequent and rare terms
    passages = []
    for i in range(157):
        words = rng.choice(WORDS, size=int(rng.integers(1, 30)), p=weights / weights.sum())
        passages.append(Passage(id=i, title=f"T{i % 11}", text=" ".join(words)))
    return passages


def _build(root: Path, passages: list[Passage], shards: int) -> str:
    vectors = np.random.default_rng(0).standard_normal((len(passages), 8)).astype(np.float32)  # (N, d)
    return build_index_from_vectors(vectors, passages, root, shards=shards)


def _search(root: Path, version: str, questions: list[str], k: int):
    manifest = load_manifest(root, version)
    shards = [
        Shard(ShardConfig(index_root=str(root), version=version, shard=s))
        for s in range(len(manifest.shards))
    ]
    tokens = query_tokens(questions, manifest)
    return merge_hits([s.search_bm25(tokens, k, return_vectors=True) for s in shards], k, 1.0, True)


def _brute_force(passages: list[Passage], question: str, params: Bm25Params) -> np.ndarray:
    """Lucene BM25 of every passage by the textbook loop, in float64."""
    docs = [Counter(tokens) for tokens in tokenize([passage_text(p) for p in passages], params)]
    lengths = [sum(doc.values()) for doc in docs]
    avgdl = sum(lengths) / len(docs)
    scores = np.zeros(len(docs))
    for term in tokenize([question], params)[0]:
        df = sum(term in doc for doc in docs)
        if df == 0:
            continue
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for d, doc in enumerate(docs):
            tf = doc[term]
            scores[d] += idf * tf / (tf + params.k1 * (1 - params.b + params.b * lengths[d] / avgdl))
    return scores


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_sharded_bm25_equals_one_index(tmp_path: Path, corpus: list[Passage], shards: int) -> None:
    """Corpus-wide idf and avgdl: S shards' merged top-k has the same ids and the same float32 scores."""
    single = _search(tmp_path / "one", _build(tmp_path / "one", corpus, 1), QUERIES, 10)
    sharded = _search(tmp_path / "many", _build(tmp_path / "many", corpus, shards), QUERIES, 10)
    np.testing.assert_array_equal(sharded.ids, single.ids)
    np.testing.assert_array_equal(sharded.scores, single.scores)
    np.testing.assert_array_equal(sharded.vectors, single.vectors)
    assert sharded.titles == single.titles and sharded.texts == single.texts


def test_bm25_matches_a_brute_force_loop_and_bm25s(tmp_path: Path, corpus: list[Passage]) -> None:
    params = Bm25Params()
    found = _search(tmp_path, _build(tmp_path, corpus, 3), QUERIES, 10)
    library = bm25s.BM25(method="lucene", k1=params.k1, b=params.b)
    library.index(tokenize([passage_text(p) for p in corpus], params), show_progress=False)
    for b, question in enumerate(QUERIES):
        expected = _brute_force(corpus, question, params)  # (N,)
        hits = found.ids[b][found.ids[b] >= 0]
        assert len(hits) == min(10, int((expected > 0).sum()))
        np.testing.assert_allclose(found.scores[b, : len(hits)], expected[hits], rtol=1e-5)
        if len(hits):
            kth = np.sort(expected)[::-1][len(hits) - 1]
            assert expected[hits].min() >= kth - 1e-5  # no better passage left out
            query = tokenize([question], params)[0]
            np.testing.assert_allclose(library.get_scores(query)[hits], expected[hits], rtol=1e-5)
    assert (found.ids[3] == -1).all()  # no known term: no hits, not zero-score passages


def test_top_rows_breaks_ties_by_position_and_skips_zeros() -> None:
    scores, rows = top_rows(np.array([0.0, 2.0, 1.0, 2.0, 2.0, 0.0], np.float32), 2)
    np.testing.assert_array_equal(rows, [1, 3])
    np.testing.assert_array_equal(scores, [2.0, 2.0])
    assert len(top_rows(np.array([0.0, 1.0], np.float32), 5)[1]) == 1


def test_bm25_files_are_in_the_manifest_with_checksums(tmp_path: Path, corpus: list[Passage]) -> None:
    version = _build(tmp_path, corpus, 2)
    manifest = load_manifest(tmp_path, version)
    assert manifest.bm25 is not None and manifest.bm25["count"] == len(corpus)
    for entry in manifest.shards:
        for role in ("bm25_data", "bm25_rows", "bm25_indptr", "bm25_vocab"):
            assert entry.files[role] in entry.sha256
    tampered = version_dir(tmp_path, version) / manifest.shards[1].files["bm25_data"]
    tampered.write_bytes(tampered.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ValueError, match="checksum mismatch"):
        Shard(ShardConfig(index_root=str(tmp_path), version=version, shard=1))


def test_a_version_without_bm25_says_so(tmp_path: Path, corpus: list[Passage]) -> None:
    version = _build(tmp_path, corpus, 1)
    manifest = load_manifest(tmp_path, version)
    old = type(manifest)(**{**manifest.__dict__, "bm25": None})
    with pytest.raises(ValueError, match="has no BM25 index"):
        query_tokens(["paris"], old)
