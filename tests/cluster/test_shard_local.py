"""One Shard built in-process (no Ray): exact search, stored vectors, checksum refusal, bad params."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from bench.shard_memory import read_smaps_rollup
from cluster.index_build import build_index_from_vectors
from cluster.index_store import load_manifest, version_dir
from cluster.passages import Passage
from cluster.shard import SearchConfig, Shard, ShardConfig


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, list[Passage]]:
    vectors = np.random.default_rng(1).standard_normal((300, 24)).astype(np.float32)  # (N, d)
    return vectors, [Passage(id=i, title=f"t{i}", text=f"passage {i}") for i in range(300)]


@pytest.mark.parametrize("index_type", ["Flat", "IVF8,PQ4x4"])
def test_shard_search_and_vectors(tmp_path: Path, corpus, index_type: str) -> None:
    vectors, passages = corpus
    version = build_index_from_vectors(
        vectors,
        passages,
        tmp_path,
        shards=2,
        index_type=index_type,
        search_params={"nprobe": 8} if "IVF" in index_type else None,
    )
    shard = Shard(
        ShardConfig(index_root=str(tmp_path), version=version, shard=1, search=SearchConfig(faiss_threads=1))
    )
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
    assert shard.health()["count"] == 150


def test_flat_shard_maps_its_files_rather_than_copying_them(tmp_path: Path) -> None:
    """The index codes are read through a memory map: after loading and a search that scans every
    vector, the index file is mapped and anonymous memory grew by far less than the vectors' size."""
    vectors = np.random.default_rng(2).standard_normal((110_000, 96)).astype(np.float32)  # (N, d)
    # 42 MB: above malloc's largest mmap threshold (32 MB), so a copy would take fresh anonymous pages
    passages = [Passage(id=i, title=f"t{i}", text="p") for i in range(len(vectors))]
    version = build_index_from_vectors(vectors, passages, tmp_path, shards=1)
    index_file = version_dir(tmp_path, version) / load_manifest(tmp_path, version).shards[0].files["index"]
    before = read_smaps_rollup(os.getpid())["Anonymous"]
    shard = Shard(ShardConfig(index_root=str(tmp_path), version=version, shard=0))
    hits = shard.search(vectors[:3], k=5, return_vectors=True)
    grown = read_smaps_rollup(os.getpid())["Anonymous"] - before
    np.testing.assert_array_equal(hits.ids[:, 0], [0, 1, 2])
    mapped = {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if len(line.split()) >= 6
    }
    assert str(index_file) in mapped
    assert grown < vectors.nbytes / 2, f"anonymous memory grew {grown} bytes for {vectors.nbytes} of vectors"


def test_corrupt_file_is_refused(tmp_path: Path, corpus) -> None:
    vectors, passages = corpus
    version = build_index_from_vectors(vectors, passages, tmp_path, shards=2)
    name = load_manifest(tmp_path, version).shards[0].files["index"]
    path = version_dir(tmp_path, version) / name
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        Shard(ShardConfig(index_root=str(tmp_path), version=version, shard=0))
    Shard(ShardConfig(index_root=str(tmp_path), version=version, shard=1))  # the intact shard still loads


def test_bad_search_param(tmp_path: Path, corpus) -> None:
    vectors, passages = corpus
    version = build_index_from_vectors(vectors, passages, tmp_path, index_type="HNSW16")
    with pytest.raises(ValueError, match="nosuch"):
        Shard(
            ShardConfig(
                index_root=str(tmp_path),
                version=version,
                shard=0,
                search=SearchConfig(search_params={"nosuch": 3}),
            )
        )
    with pytest.raises(ValueError, match="faiss_threads"):
        SearchConfig(faiss_threads=0)
