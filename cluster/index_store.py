"""Index versions under a root (local path or object-store URI): manifest, checksums, commit, publish.

A version becomes visible only complete: its files are written first, its manifest last (a local
version directory is renamed into place; an object-store version is uploaded file by file, manifest
last), and the PUBLISHED pointer is written after that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster import storage

MANIFEST = "manifest.json"
POINTER = "PUBLISHED"
FORMAT = 1
_VERSION = re.compile(r"^v(\d{4,})$")
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class ShardManifest:
    """One shard's files (role → file name), passage count, global id range and checksums."""

    shard: int
    count: int
    id_min: int
    id_max: int
    files: dict[str, str]  # "index", "ids", "passages", "offsets", optionally "vectors"
    sha256: dict[str, str]  # file name → hex digest
    sizes: dict[str, int] = field(default_factory=dict)  # file name → bytes (filled by commit_version)


@dataclass(frozen=True)
class Manifest:
    """Everything a shard group needs to load and check one index version."""

    version: str
    encoder: str
    encoder_fingerprint: str
    dim: int
    metric: str
    index_type: str
    count: int
    shards: tuple[ShardManifest, ...]
    search_params: dict[str, float] = field(default_factory=dict)
    bm25: dict | None = None  # cluster/bm25.py's statistics and settings; None: a version without BM25
    format: int = FORMAT
    recall_at_10: float | None = None  # sharded index vs exact search, measured before publish
    recall_ci95: float | None = None  # half-width of its 95 % interval over the sampled queries
    build_fingerprint: str = ""  # names the streaming build's work directory

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        shards = tuple(ShardManifest(**shard) for shard in data.pop("shards"))
        return cls(shards=shards, **data)


def check_version_name(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ValueError(f"bad index version name {version!r}: expected 'v' + 4 digits, e.g. 'v0001'")
    return version


def version_dir(root: str | Path, version: str) -> Path:
    """A version's directory under a local root (use `version_location` for any root)."""
    if storage.is_uri(root):
        raise ValueError(f"{str(root)!r} is an object-store root, not a local directory")
    return Path(root) / check_version_name(version)


def version_location(root: str | Path, version: str) -> str:
    """A version's directory (local root) or prefix (object-store root)."""
    return storage.join(root, check_version_name(version))


def list_versions(root: str | Path) -> list[str]:
    """Complete versions (a version directory holding a manifest), oldest first."""
    found = [
        name
        for name in storage.list_names(root)
        if _VERSION.match(name) and storage.exists(storage.join(root, name, MANIFEST))
    ]
    return sorted(found, key=lambda name: int(name[1:]))


def published_version(root: str | Path) -> str | None:
    """The version the pointer file names, or None when nothing was published."""
    pointer = storage.join(root, POINTER)
    if not storage.exists(pointer):
        return None
    return check_version_name(storage.read_bytes(pointer).decode("utf-8").strip())


def check_index_root(root: str | Path) -> str:
    """`root` as given; ValueError naming it unless it holds at least one complete version."""
    if not list_versions(root):
        raise ValueError(
            f"{str(root)!r} is not an index root (no complete version directory v000N/{MANIFEST})"
        )
    return str(root)


def load_manifest(root: str | Path, version: str) -> Manifest:
    path = storage.join(version_location(root, version), MANIFEST)
    if not storage.exists(path):
        raise ValueError(f"index version {version!r} not found under {str(root)!r} (no {path})")
    try:
        manifest = Manifest.from_dict(json.loads(storage.read_bytes(path).decode("utf-8")))
    except (json.JSONDecodeError, TypeError, KeyError) as error:
        raise ValueError(f"index version {version!r}: unreadable manifest {path}: {error}") from error
    if manifest.version != version:
        raise ValueError(f"manifest {path} names version {manifest.version!r}, not {version!r}")
    return manifest


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_shard_files(directory: str | Path, shard: ShardManifest) -> None:
    """Raise ValueError when a shard file is missing or its checksum differs from the manifest."""
    for name, expected in shard.sha256.items():
        path = Path(directory) / name
        if not path.is_file():
            raise ValueError(f"shard {shard.shard}: file {str(path)!r} is missing")
        check_checksum(path, expected, shard.shard)


def check_checksum(path: str | Path, expected: str, shard: int) -> None:
    """Raise ValueError naming the file when its SHA-256 is not `expected`."""
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"shard {shard}: checksum mismatch for {str(path)!r} "
            f"(manifest {expected[:12]}…, file {actual[:12]}…)"
        )


def staging_dir(root: str | Path) -> Path:
    """A fresh local directory to write a version into before commit: hidden inside a local root (so
    that the commit is a rename), a temporary directory for an object-store root."""
    if storage.is_uri(root):
        return Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
    path = Path(root) / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _with_sizes(manifest: Manifest, staged: Path) -> Manifest:
    """The manifest with each shard file's size in bytes, read from the staged directory."""
    shards = tuple(
        dataclasses.replace(s, sizes={name: (staged / name).stat().st_size for name in s.sha256})
        for s in manifest.shards
    )
    return dataclasses.replace(manifest, shards=shards)


def _next_number(root: str | Path) -> int:
    """One past the highest version name under `root`, complete or not (a half-written one keeps
    its number)."""
    names = [name for name in storage.list_names(root) if _VERSION.match(name)]
    return max((int(name[1:]) for name in names), default=0) + 1


def commit_version(root: str | Path, staged: Path, manifest: Manifest) -> str:
    """Make the staged local directory the next version under `root` and return its name; the staged
    directory is consumed. Files first, manifest last, so no reader sees a partial version."""
    manifest = _with_sizes(manifest, Path(staged))
    if storage.is_uri(root):
        return _upload_version(str(root), Path(staged), manifest)
    root = Path(root)
    number = _next_number(root)
    while True:
        version = f"v{number:04d}"
        data = json.loads(manifest.to_json()) | {"version": version}
        tmp = staged / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, staged / MANIFEST)
        _fsync_dir(staged)
        try:
            os.rename(staged, root / version)  # fails if another build took the name
        except OSError:
            number += 1
            continue
        _fsync_dir(root)
        return version


def _upload_version(root: str, staged: Path, manifest: Manifest) -> str:
    """Upload every staged file under the next free version prefix, then the manifest.

    An object store has no rename, so one writer per root at a time: a prefix that already holds
    objects (another upload, or a dead one) is skipped, not overwritten."""
    number = _next_number(root)
    while storage.list_names(storage.join(root, f"v{number:04d}")):
        number += 1
    version = f"v{number:04d}"
    location = version_location(root, version)
    for shard in manifest.shards:
        for name in shard.sha256:
            storage.upload(staged / name, storage.join(location, name))
    data = json.loads(manifest.to_json()) | {"version": version}
    storage.write_bytes(storage.join(location, MANIFEST), json.dumps(data, indent=1).encode("utf-8"))
    shutil.rmtree(staged, ignore_errors=True)
    return version


def publish(root: str | Path, version: str) -> None:
    """Atomically point `root`'s pointer file at an existing complete version."""
    load_manifest(root, version)
    storage.write_bytes(storage.join(root, POINTER), (version + "\n").encode("utf-8"))
    if not storage.is_uri(root):
        _fsync_dir(Path(root))


def resolve_version(root: str | Path, version: str | None) -> str:
    """`version`, or the published one (the newest complete one when none is published)."""
    check_index_root(root)
    if version is not None:
        return check_version_name(version)
    return published_version(root) or list_versions(root)[-1]
