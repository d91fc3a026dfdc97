"""BM25 through a ShardGroup on real local Ray: equal to one in-process index, swapped with the dense side."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from cluster.bm25 import query_tokens
from cluster.index_build import build_index_from_vectors
from cluster.index_store import load_manifest
from cluster.passages import Passage
from cluster.shard import Shard, ShardConfig
from cluster.shard_group import ShardGroup, ShardGroupConfig

WORDS = "river paris seine rhine london thames city bridge flows north sea island king queen war".split()
QUESTIONS = ["Which river flows through Paris?", "king queen", "sea bridge island city"]


def _corpus(tag: str, seed: int, n: int = 400) -> tuple[np.ndarray, list[Passage]]:
    rng = np.random.default_rng(seed)
    passages = [
        Passage(id=i, title=f"{tag}-{i}", text=" ".join(rng.choice(WORDS, size=int(rng.integers(2, 40)))))
        for i in range(n)
    ]
    return rng.standard_normal((n, 16)).astype(np.float32), passages


def _queries(count: int) -> np.ndarray:
    return np.random.default_rng(9).standard_normal((count, 16)).astype(np.float32)  # (B, d)


@pytest.mark.slow
def test_group_bm25_equals_one_index_and_swaps_with_the_dense_side(ray_session, tmp_path: Path) -> None:
    vectors, passages = _corpus("old", 0)
    one = build_index_from_vectors(vectors, passages, tmp_path / "one", shards=1)
    reference = Shard(ShardConfig(index_root=str(tmp_path / "one"), version=one, shard=0))
    expected = reference.search_bm25(query_tokens(QUESTIONS, load_manifest(tmp_path / "one", one)), 8)
    old = build_index_from_vectors(vectors, passages, tmp_path / "group", shards=3)
    new = build_index_from_vectors(*_corpus("new", 1), tmp_path / "group", shards=3)
    group = ShardGroup(ShardGroupConfig(index_root=str(tmp_path / "group"), shard_cpus=0.05), version=old)
    stop, answers = threading.Event(), []

    def stream() -> None:
        while not stop.is_set():
            answers.append(group.search_retrievers(_queries(3), QUESTIONS, 8, ("dense", "bm25")))

    worker = threading.Thread(target=stream)
    try:
        found = group.search_retrievers(_queries(3), QUESTIONS, 8, ("dense", "bm25"), return_vectors=True)
        np.testing.assert_array_equal(found["bm25"].ids, expected.ids)
        np.testing.assert_array_equal(found["bm25"].scores, expected.scores)
        np.testing.assert_array_equal(found["bm25"].vectors, vectors[found["bm25"].ids])
        worker.start()
        group.swap(new)
        after = group.search_retrievers(_queries(3), QUESTIONS, 8, ("bm25",))["bm25"]
    finally:
        stop.set()
        worker.join(timeout=60)
        group.close()
    assert after.version == new and all(t.startswith("new-") for row in after.titles for t in row if t)
    for answer in answers:  # both parts of every answer come from one version, titles included
        assert answer["dense"].version == answer["bm25"].version
        tag = "old" if answer["bm25"].version == old else "new"
        assert all(
            t.startswith(f"{tag}-") for part in answer.values() for row in part.titles for t in row if t
        )
