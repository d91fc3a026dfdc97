"""Index versions on an object-store root (a moto S3 server on 127.0.0.1) and the node-local shard cache."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest

from cluster import storage
from cluster.cli import run_list
from cluster.index_build import build_index_from_vectors
from cluster.index_store import (
    MANIFEST,
    check_index_root,
    commit_version,
    list_versions,
    load_manifest,
    publish,
    published_version,
    resolve_version,
    staging_dir,
    version_dir,
    version_location,
)
from cluster.passages import Passage
from cluster.shard import SearchConfig, Shard, ShardConfig
from cluster.shard_cache import shard_files


def _vectors(n: int = 400, dim: int = 16) -> np.ndarray:
    vectors = np.random.default_rng(3).standard_normal((n, dim)).astype(np.float32)  # (N, d)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _upload_local_version(local_root: Path, root: str, vectors: np.ndarray, shards: int = 2) -> str:
    """Build a version under a local root, then commit a copy of it to `root` (files, then manifest)."""
    local = build_index_from_vectors(
        vectors, [Passage(i, f"t{i}", f"p{i}") for i in range(len(vectors))], local_root, shards=shards
    )
    staged = staging_dir(root)
    shutil.copytree(version_dir(local_root, local), staged, dirs_exist_ok=True)
    return commit_version(root, staged, load_manifest(local_root, local))


@pytest.fixture
def root(s3_root: str, request: pytest.FixtureRequest) -> str:
    return f"{s3_root}/{request.node.name}"


def test_commit_publish_and_half_uploaded_version(root: str, tmp_path: Path) -> None:
    vectors = _vectors()
    assert list_versions(root) == [] and published_version(root) is None
    first = _upload_local_version(tmp_path / "local", root, vectors)
    manifest = load_manifest(root, first)
    for shard in manifest.shards:
        for name, size in shard.sizes.items():
            assert storage.size(storage.join(version_location(root, first), name)) == size > 0
    # a killed upload: the files of v0002 are there, its manifest is not
    half = version_location(root, "v0002")
    for name in manifest.shards[0].files.values():
        storage.write_bytes(storage.join(half, name), b"partial")
    assert list_versions(root) == [first] and resolve_version(root, None) == first
    with pytest.raises(ValueError, match="v0002"):
        publish(root, "v0002")
    assert published_version(root) is None
    third = _upload_local_version(tmp_path / "local", root, vectors[::-1].copy())
    assert (first, third) == ("v0001", "v0003")  # the half-written prefix keeps its number
    publish(root, first)
    assert published_version(root) == first
    publish(root, third)
    assert published_version(root) == third and list_versions(root) == [first, third]


def test_cli_lists_an_object_store_root(root: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    publish(root, _upload_local_version(tmp_path / "local", root, _vectors()))

    class Args:  # `rayrag index list --index-root s3://…`
        index_root = root

    assert run_list(Args()) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (row["version"], row["published"], row["shards"], row["count"]) == ("v0001", True, 2, 400)


def test_shard_from_object_store_equals_flat_index(root: str, tmp_path: Path) -> None:
    vectors = _vectors()
    version = _upload_local_version(tmp_path / "local", root, vectors, shards=1)
    shard = Shard(
        ShardConfig(
            index_root=root, version=version, shard=0, search=SearchConfig(cache_dir=str(tmp_path / "cache"))
        )
    )
    reference = faiss.IndexFlatIP(vectors.shape[1])
    reference.add(vectors)
    hits = shard.search(vectors[:5], 7)
    assert np.array_equal(hits.ids, reference.search(vectors[:5], 7)[1])
    assert sorted(shard.fetched) == sorted(load_manifest(root, version).shards[0].sha256)


def test_concurrent_replicas_fetch_each_file_once(root: str, tmp_path: Path) -> None:
    version = _upload_local_version(tmp_path / "local", root, _vectors())
    entry = load_manifest(root, version).shards[1]
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:  # flock excludes across open files, so threads contend too
        results = list(pool.map(lambda _: shard_files(root, version, entry, cache, True), range(4)))
    fetched = [name for _, names in results for name in names]
    assert sorted(fetched) == sorted(entry.sha256)  # every file once, by whichever replica came first
    assert all(paths == results[0][0] for paths, _ in results)
    assert sorted(p.name for p in (cache / "sha256").iterdir()) == sorted(entry.sha256.values())
    assert shard_files(root, version, entry, cache, True)[1] == []  # a later start: size check only


def test_corrupt_object_is_refused_and_not_cached(root: str, tmp_path: Path) -> None:
    version = _upload_local_version(tmp_path / "local", root, _vectors())
    entry = load_manifest(root, version).shards[0]
    location = storage.join(version_location(root, version), entry.files["index"])
    data = bytearray(storage.read_bytes(location))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(location, bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="checksum mismatch"):
        shard_files(root, version, entry, cache, True)
    assert not (cache / "sha256" / entry.sha256[entry.files["index"]]).exists()
    assert not any(path.name.endswith(".part") for path in (cache / "sha256").iterdir())


def test_missing_object_names_the_file(root: str, tmp_path: Path) -> None:
    version = _upload_local_version(tmp_path / "local", root, _vectors())
    entry = load_manifest(root, version).shards[0]
    fs, path = storage.resolve(storage.join(version_location(root, version), entry.files["ids"]))
    fs.delete_file(path)
    with pytest.raises(ValueError, match=rf"{entry.files['ids']}.*missing"):
        shard_files(root, version, entry, tmp_path / "cache", True)


def test_local_root_read_in_place_and_hashed_once(tmp_path: Path) -> None:
    root = tmp_path / "index"
    version = build_index_from_vectors(
        _vectors(), [Passage(i, "t", f"p{i}") for i in range(400)], root, shards=1
    )
    entry = load_manifest(root, version).shards[0]
    cache = tmp_path / "cache"
    paths, hashed = shard_files(root, version, entry, cache, True)
    assert all(path.parent == version_dir(root, version) for path in paths.values())
    assert sorted(hashed) == sorted(entry.sha256)
    assert shard_files(root, version, entry, cache, True)[1] == []
    ids = paths["ids"]
    data = bytearray(ids.read_bytes())
    data[-1] ^= 0xFF  # same size, rewritten: checked again, and refused
    ids.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        shard_files(root, version, entry, cache, True)
    ids.write_bytes(b"short")
    with pytest.raises(ValueError, match="5 bytes"):
        shard_files(root, version, entry, cache, False)


def test_manifest_is_the_last_object_written(root: str, tmp_path: Path, monkeypatch) -> None:
    """Files first, manifest last; an upload that dies before its manifest leaves no version."""
    local = tmp_path / "local"
    version = build_index_from_vectors(_vectors(), [Passage(i, "t", "p") for i in range(400)], local)
    manifest = load_manifest(local, version)
    writes: list[str] = []
    upload, write_bytes = storage.upload, storage.write_bytes

    def recorded(function, fail_after: int | None, location_arg: int):
        def call(*args) -> None:
            if fail_after is not None and len(writes) >= fail_after:
                raise OSError("connection reset")
            writes.append(Path(str(args[location_arg])).name)
            function(*args)

        return call

    for fail_after, expected in ((2, []), (None, ["v0002"])):  # the dead upload keeps v0001
        writes.clear()
        monkeypatch.setattr(storage, "upload", recorded(upload, fail_after, 1))
        monkeypatch.setattr(storage, "write_bytes", recorded(write_bytes, fail_after, 0))
        staged = staging_dir(root)
        shutil.copytree(version_dir(local, version), staged, dirs_exist_ok=True)
        try:
            commit_version(root, staged, manifest)
        except OSError:
            assert fail_after is not None
        assert list_versions(root) == expected
    files = sorted(name for shard in manifest.shards for name in shard.sha256)
    assert sorted(writes[:-1]) == files and writes[-1] == MANIFEST


@pytest.mark.parametrize("root", ["s3:///no-bucket", "s3://no-such-bucket/x", "nosuch://b/x"])
def test_bad_object_store_root_is_named(s3_root: str, root: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(root))):
        check_index_root(root)
