"""Index versions on disk: build from vectors, manifest, atomic commit/publish, bad input (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster import index_build
from cluster.cli import run_list
from cluster.index_build import build_index_from_vectors, shard_bounds
from cluster.index_store import (
    check_index_root,
    list_versions,
    load_manifest,
    publish,
    published_version,
    resolve_version,
    verify_shard_files,
    version_dir,
)
from cluster.passages import Passage


def _corpus(n: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, list[Passage]]:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)  # (N, d)
    return vectors, [
        Passage(id=i, title=f"title {i}", text=f"text of passage {i} — ünïcode") for i in range(n)
    ]


def test_build_writes_manifest_and_publishes(tmp_path: Path) -> None:
    vectors, passages = _corpus(50)
    first = build_index_from_vectors(
        vectors, passages, tmp_path, shards=3, encoder="enc", encoder_fingerprint="f1"
    )
    second = build_index_from_vectors(vectors, passages, tmp_path, shards=2, publish=False)
    assert (first, second) == ("v0001", "v0002")
    assert list_versions(tmp_path) == ["v0001", "v0002"] and published_version(tmp_path) == "v0001"
    assert resolve_version(tmp_path, None) == "v0001"
    manifest = load_manifest(tmp_path, first)
    assert (manifest.dim, manifest.count, manifest.encoder, manifest.encoder_fingerprint) == (
        16,
        50,
        "enc",
        "f1",
    )
    assert [(s.id_min, s.id_max, s.count) for s in manifest.shards] == [
        (0, 16, 17),
        (17, 32, 16),
        (33, 49, 17),
    ]
    for shard in manifest.shards:
        verify_shard_files(version_dir(tmp_path, first), shard)
    publish(tmp_path, second)
    assert published_version(tmp_path) == "v0002"


def test_interrupted_build_leaves_no_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vectors, passages = _corpus(30)
    build_index_from_vectors(vectors, passages, tmp_path, shards=1)
    calls = []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    real = index_build._write_shard
    monkeypatch.setattr(index_build, "_write_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_index_from_vectors(vectors, passages, tmp_path, shards=2)
    assert list_versions(tmp_path) == ["v0001"] and published_version(tmp_path) == "v0001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PUBLISHED", "v0001"]


def test_staging_dir_without_manifest_is_not_a_version(tmp_path: Path) -> None:
    (tmp_path / "v0007").mkdir()  # e.g. a half-copied directory
    with pytest.raises(ValueError, match=str(tmp_path)):
        check_index_root(tmp_path)
    vectors, passages = _corpus(10)
    assert build_index_from_vectors(vectors, passages, tmp_path) == "v0008"


@pytest.mark.parametrize("index_type", ["Bogus12", "", "IVF4096,PQ7"])
def test_unknown_index_type(tmp_path: Path, index_type: str) -> None:
    vectors, passages = _corpus(20)
    with pytest.raises(ValueError, match="index type"):
        build_index_from_vectors(vectors, passages, tmp_path, index_type=index_type)
    assert list_versions(tmp_path) == []


def test_untrainable_index_names_the_type(tmp_path: Path) -> None:
    vectors, passages = _corpus(20)
    with pytest.raises(ValueError, match="IVF64,Flat"):
        build_index_from_vectors(vectors, passages, tmp_path, index_type="IVF64,Flat")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_bad_vectors_and_shards(tmp_path: Path) -> None:
    vectors, passages = _corpus(10)
    with pytest.raises(ValueError, match="float64"):
        build_index_from_vectors(vectors.astype(np.float64), passages, tmp_path)
    with pytest.raises(ValueError, match="11"):
        shard_bounds(10, 11)


def test_not_an_index_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nowhere"):
        check_index_root(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="v0003"):
        vectors, passages = _corpus(10)
        build_index_from_vectors(vectors, passages, tmp_path)
        load_manifest(tmp_path, "v0003")


def test_cli_list(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    vectors, passages = _corpus(12)
    build_index_from_vectors(vectors, passages, tmp_path, shards=2, index_type="HNSW32")

    class Args:
        index_root = str(tmp_path)

    assert run_list(Args()) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["version"] == "v0001" and row["published"] and row["shards"] == 2
