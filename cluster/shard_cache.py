"""Node-local shard files: an object-store file is fetched once per node and verified once; a local one
is read in place, its checksum checked once per node. Either way a replica then memory-maps it."""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster import storage
from cluster.index_store import ShardManifest, check_checksum, version_location

CACHE_ENV = "RAYRAG_SHARD_CACHE"  # a node's cache directory, when the config names none


def cache_dir(configured: str | None = None) -> Path:
    """`configured`, else $RAYRAG_SHARD_CACHE on this node, else ~/.rayrag-cache/shards."""
    chosen = configured or os.environ.get(CACHE_ENV) or Path.home() / ".rayrag-cache" / "shards"
    return Path(chosen).expanduser()


def shard_files(
    root: str | Path, version: str, entry: ShardManifest, cache: Path, verify: bool
) -> tuple[dict[str, Path], list[str]]:
    """(role → local path of each file of the shard, names this call fetched or hashed).

    The start check is the size the manifest records; the SHA-256 is checked only by the process
    that fetches a file (object store) or first sees it on this node (local root), under a lock."""
    location = version_location(root, version)
    paths, work = {}, []
    for role, name in entry.files.items():
        source = storage.join(location, name)
        expected = entry.sha256.get(name)
        if expected is None:
            raise ValueError(f"shard {entry.shard}: file {name!r} has no checksum in the manifest")
        if storage.is_uri(root):
            size = _expected_size(entry, name, source)
            paths[role], did = _fetched(source, expected, size, cache, verify, entry.shard)
        else:
            paths[role], did = _in_place(Path(source), expected, entry, cache, verify)
        work += [name] if did else []
    return paths, work


def _expected_size(entry: ShardManifest, name: str, source: str) -> int:
    """The manifest's size of `name`, or the stored object's for manifests that predate sizes."""
    if name in entry.sizes:
        return entry.sizes[name]
    try:
        return storage.size(source)
    except FileNotFoundError as error:
        raise ValueError(f"shard {entry.shard}: file {source!r} is missing") from error


def _fetched(source: str, sha: str, size: int, cache: Path, verify: bool, shard: int) -> tuple[Path, bool]:
    """The cached copy of `source` (named by its checksum), fetched and verified first if absent."""
    target = cache / "sha256" / sha
    if _has_size(target, size):
        return target, False
    with _locked(cache, sha):
        if _has_size(target, size):  # another replica on this node fetched it meanwhile
            return target, False
        aside = target.with_name(f"{sha}.{uuid.uuid4().hex}.part")
        try:
            _download(source, aside, shard)
            if aside.stat().st_size != size:
                raise ValueError(
                    f"shard {shard}: {source!r} holds {aside.stat().st_size} bytes, the manifest {size}"
                )
            if verify:
                check_checksum(aside, sha, shard)
            aside.replace(target)
        finally:
            aside.unlink(missing_ok=True)
    return target, True


def _download(source: str, local: Path, shard: int) -> None:
    try:
        storage.download(source, local)
    except FileNotFoundError as error:
        raise ValueError(f"shard {shard}: file {source!r} is missing") from error


def _in_place(path: Path, sha: str, entry: ShardManifest, cache: Path, verify: bool) -> tuple[Path, bool]:
    """A local root's file itself: read in place (it is already on a filesystem this node maps)."""
    if not path.is_file():
        raise ValueError(f"shard {entry.shard}: file {str(path)!r} is missing")
    stat = path.stat()
    expected = entry.sizes.get(path.name, stat.st_size)
    if stat.st_size != expected:
        raise ValueError(
            f"shard {entry.shard}: {str(path)!r} holds {stat.st_size} bytes, the manifest {expected}"
        )
    if not verify:
        return path, False
    # the mark names the file's identity and mtime: a file rewritten in place is checked again
    mark = cache / "verified" / f"{sha}-{stat.st_dev}-{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}"
    if mark.exists():
        return path, False
    with _locked(cache, sha):
        if mark.exists():
            return path, False
        check_checksum(path, sha, entry.shard)
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
    return path, True


def _has_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


@contextmanager
def _locked(cache: Path, sha: str) -> Iterator[None]:
    """An exclusive lock on one file's work on this node, released when the holder exits or dies."""
    lock_path = cache / "locks" / f"{sha}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
