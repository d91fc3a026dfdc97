"""On-disk index versions: manifest, checksums, atomic commit and publish via a pointer file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    return Path(root) / check_version_name(version)


def list_versions(root: str | Path) -> list[str]:
    """Complete versions (a version directory holding a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p.name for p in root.iterdir() if _VERSION.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda name: int(name[1:]))


def published_version(root: str | Path) -> str | None:
    """The version the pointer file names, or None when nothing was published."""
    pointer = Path(root) / POINTER
    if not pointer.is_file():
        return None
    return check_version_name(pointer.read_text(encoding="utf-8").strip())


def check_index_root(root: str | Path) -> Path:
    """Raise ValueError naming `root` unless it holds at least one complete version."""
    path = Path(root)
    if not path.is_dir() or not list_versions(path):
        raise ValueError(
            f"{str(root)!r} is not an index root (no complete version directory v000N/{MANIFEST})"
        )
    return path


def load_manifest(root: str | Path, version: str) -> Manifest:
    path = version_dir(root, version) / MANIFEST
    if not path.is_file():
        raise ValueError(f"index version {version!r} not found under {str(root)!r} (no {path})")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
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
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(
                f"shard {shard.shard}: checksum mismatch for {str(path)!r} "
                f"(manifest {expected[:12]}…, file {actual[:12]}…)"
            )


def staging_dir(root: str | Path) -> Path:
    """A fresh hidden directory inside `root` to write a version into before commit."""
    path = Path(root) / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_version(root: str | Path, staged: Path, manifest: Manifest) -> str:
    """Write the manifest last, then rename the staged directory to the next free version name."""
    root = Path(root)
    existing = list_versions(root) + [p.name for p in root.iterdir() if _VERSION.match(p.name)]
    number = max((int(name[1:]) for name in existing), default=0) + 1
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


def publish(root: str | Path, version: str) -> None:
    """Atomically point `root`'s pointer file at an existing complete version."""
    load_manifest(root, version)
    tmp = Path(root) / f"{_TMP_PREFIX}{POINTER}-{uuid.uuid4().hex}"
    tmp.write_text(version + "\n", encoding="utf-8")
    os.replace(tmp, Path(root) / POINTER)
    _fsync_dir(Path(root))


def resolve_version(root: str | Path, version: str | None) -> str:
    """`version`, or the published one (the newest complete one when none is published)."""
    check_index_root(root)
    if version is not None:
        return check_version_name(version)
    return published_version(root) or list_versions(root)[-1]
