"""One Shard built in-process (no Ray): exact search, stored vectors, checksum refusal, bad params."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from cluster.index_build import build_index_from_vectors
from cluster.index_store import load_manifest, version_dir
from cluster.passages import Passage
from cluster.shard import Shard, ShardConfig


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, list[Passage]]:
    vectors = np.random.default_rng(1).standard_normal((300, 24)).astype(np.float32)  # (N, d)
    return vectors, [Passage(id=i, title=f"t{i}", text=f"passage {i}") for i in range(300)]


@pytest.mark.parametrize("index_type", ["Flat", "IVF8,PQ4x4"])
def test_shard_search_and_vectors(tmp_path: Path, corpus, index_type: str) -> None:
    vectors, passages = corpus
    version = build_index_from_vectors(vectors, passages, tmp_path, shards=2, index_type=index_type,
                                       search_params={"nprobe": 8} if "IVF" in index_type else None)
    shard = Shard(ShardConfig(str(tmp_path), version, shard=1, faiss_threads=1))
    queries = vectors[[160, 299]] + 0.01  # (2, d)
    hits = shard.search(queries, k=4, return_vectors=True)
    assert hits.ids.shape == (2, 4) and hits.version == version and hits.shard == 1
    assert hits.ids.min() >= 150  # shard 1 holds ids 150..299
    np.testing.assert_array_equal(hits.vectors, vectors[hits.ids])  # stored vectors, not PQ codes
    assert hits.titles[0] == [f"t{i}" for i in hits.ids[0]]
    if index_type == "Flat":
        reference = faiss.IndexFlatIP(24)
        reference.add(vectors[150:])
        scores, rows = reference.search(queries, 4)
        np.testing.assert_array_equal(hits.ids, rows + 150)
        np.testing.assert_allclose(hits.scores, scores, atol=1e-5)
    assert shard.search(queries, k=1000).ids.shape == (2, 150)  # k capped at the shard size
    assert shard.health()["count"] == 150 and shard.memory()["Rss"] > 0


def test_corrupt_file_is_refused(tmp_path: Path, corpus) -> None:
    vectors, passages = corpus
    version = build_index_from_vectors(vectors, passages, tmp_path, shards=2)
    name = load_manifest(tmp_path, version).shards[0].files["index"]
    path = version_dir(tmp_path, version) / name
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        Shard(ShardConfig(str(tmp_path), version, shard=0))
    Shard(ShardConfig(str(tmp_path), version, shard=1))  # the intact shard still loads


def test_bad_search_param(tmp_path: Path, corpus) -> None:
    vectors, passages = corpus
    version = build_index_from_vectors(vectors, passages, tmp_path, index_type="HNSW16")
    with pytest.raises(ValueError, match="nosuch"):
        Shard(ShardConfig(str(tmp_path), version, shard=0, search_params={"nosuch": 3}))
    with pytest.raises(ValueError, match="faiss_threads"):
        ShardConfig(str(tmp_path), version, shard=0, faiss_threads=0)
