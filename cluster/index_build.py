"""Building index versions: the corpus encoded on Ray, S shards, one FAISS index per shard."""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from cluster.bm25 import Bm25Params
from cluster.bm25 import add_to_version as add_bm25
from cluster.encode_pool import encode_on_ray
from cluster.index_store import Manifest, ShardManifest, commit_version, sha256_file, staging_dir
from cluster.index_store import publish as publish_version
from cluster.passages import Passage, passage_text
from cluster.shard import PassageTable

METRIC = "inner_product"
_IVF = re.compile(r"IVF(\d+)")


def make_faiss_index(index_type: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a FAISS factory string; ValueError naming a bad one."""
    if not isinstance(index_type, str) or not index_type.strip():
        raise ValueError(f"index type must be a FAISS factory string, got {index_type!r}")
    try:
        return faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(
            f"unknown or unusable index type {index_type!r} for dim {dim}: "
            f"{str(error).strip().splitlines()[-1]}"
        ) from error


def check_index_type(index_type: str, dims: tuple[int, ...] = (768, 384, 1024, 512, 256, 128, 64)) -> None:
    """Reject a factory string that no common dim accepts (before any encoding; the real dim is
    checked later)."""
    errors = []
    for dim in dims:
        try:
            make_faiss_index(index_type, dim)
            return
        except ValueError as error:
            errors.append(error)
    raise errors[0]


def default_search_params(index_type: str) -> dict[str, float]:
    """Search-time settings stored in the manifest (a shard group may override them)."""
    params: dict[str, float] = {}
    if "HNSW" in index_type:
        params["efSearch"] = 128.0
    if match := _IVF.search(index_type):
        params["nprobe"] = float(min(int(match.group(1)), 64))
    if index_type.rstrip().endswith("RFlat"):
        params["k_factor_rf"] = 16.0  # re-rank 16k candidates exactly from the mmapped vectors
    return params


def shard_bounds(count: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [start, end) row ranges, one per shard."""
    if shards < 1 or shards > count:
        raise ValueError(f"shards must be between 1 and the passage count {count}, got {shards}")
    edges = np.linspace(0, count, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _stores_exact_vectors(index: faiss.Index, vectors: np.ndarray) -> bool:
    """Whether `index.reconstruct` gives back the added vectors exactly (Flat, HNSWFlat, RFlat)."""
    probe = np.arange(min(len(vectors), 8), dtype=np.int64)
    try:
        return bool(np.array_equal(index.reconstruct_batch(probe), vectors[probe]))
    except RuntimeError:
        return False


def _train_and_add(index_type: str, vectors: np.ndarray, shard: int) -> faiss.Index:
    index = make_faiss_index(index_type, vectors.shape[1])
    try:
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
    except RuntimeError as error:
        raise ValueError(
            f"cannot build index type {index_type!r} on shard {shard} "
            f"({len(vectors)} vectors): {str(error).strip().splitlines()[-1]}"
        ) from error
    return index


def _write_shard(
    directory: Path, shard: int, index_type: str, vectors: np.ndarray, passages: Sequence[Passage]
) -> ShardManifest:
    index = _train_and_add(index_type, vectors, shard)
    files = {
        "index": f"shard-{shard}.faiss",
        "ids": f"ids-{shard}.npy",
        "passages": f"passages-{shard}.bin",
        "offsets": f"offsets-{shard}.npy",
    }
    faiss.write_index(index, str(directory / files["index"]))
    ids = np.array([p.id for p in passages], dtype=np.int64)  # (n,)
    np.save(directory / files["ids"], ids)
    PassageTable.write(
        directory / files["passages"],
        directory / files["offsets"],
        [p.title for p in passages],
        [p.text for p in passages],
    )
    if not _stores_exact_vectors(index, vectors):
        files["vectors"] = f"vectors-{shard}.npy"
        np.save(directory / files["vectors"], vectors)
    return ShardManifest(
        shard=shard,
        count=len(passages),
        id_min=int(ids.min()),
        id_max=int(ids.max()),
        files=files,
        sha256={name: sha256_file(directory / name) for name in files.values()},
    )


def build_index_from_vectors(
    vectors: np.ndarray,
    passages: Sequence[Passage],
    index_root: str | Path,
    *,
    shards: int = 1,
    index_type: str = "Flat",
    encoder: str = "none",
    encoder_fingerprint: str = "",
    publish: bool = True,
    search_params: Mapping[str, float] | None = None,
    bm25_params: Bm25Params = Bm25Params(),
    show_progress: bool = False,
) -> str:
    """Write a new version from precomputed (N, d) vectors; returns its name (e.g. "v0002")."""
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.dtype != np.float32:
        raise ValueError(
            f"vectors must be a (N, d) float32 array, got "
            f"{getattr(vectors, 'dtype', type(vectors))} {getattr(vectors, 'shape', '')}"
        )
    if len(vectors) != len(passages):
        raise ValueError(f"{len(vectors)} vectors for {len(passages)} passages")
    make_faiss_index(index_type, vectors.shape[1])
    bounds = shard_bounds(len(passages), shards)
    root = Path(index_root)
    root.mkdir(parents=True, exist_ok=True)
    staged = staging_dir(root)
    try:
        entries = tuple(
            _write_shard(staged, s, index_type, np.ascontiguousarray(vectors[a:b]), passages[a:b])
            for s, (a, b) in enumerate(tqdm(bounds, desc="shards", disable=not show_progress))
        )
        bm25, entries = add_bm25(staged, passages, entries, bm25_params)
        manifest = Manifest(
            version="staged",
            encoder=encoder,
            encoder_fingerprint=encoder_fingerprint,
            dim=int(vectors.shape[1]),
            metric=METRIC,
            index_type=index_type,
            count=len(passages),
            shards=entries,
            search_params=dict(search_params or default_search_params(index_type)),
            bm25=bm25,
        )
        version = commit_version(root, staged, manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if publish:
        publish_version(root, version)
    return version


def build_index(
    passages: Sequence[Passage],
    index_root: str | Path,
    *,
    encoder: str = "default",
    shards: int = 1,
    index_type: str = "Flat",
    batch_size: int = 16,
    num_encoders: int | None = None,
    encoder_threads: int | None = None,
    encoder_cpus: float | None = None,
    encoder_state: dict | None = None,
    publish: bool = True,
    search_params: Mapping[str, float] | None = None,
    show_progress: bool = True,
) -> str:
    """Encode passages on Ray, shard them, write and (optionally) publish a version; returns its name.

    The encoder pool (`num_encoders` actors × `encoder_threads`, each reserving `encoder_cpus`)
    fills the CPUs Ray has free by default: see `cluster.encode_pool.plan_encoders`."""
    if not passages:
        raise ValueError("cannot build an index over an empty corpus")
    for passage in passages:
        if not isinstance(passage.text, str) or not passage.text.strip():
            raise ValueError(f"passage {passage.id} ({passage.title!r}) has no text: {passage.text!r}")
    shard_bounds(len(passages), shards)
    check_index_type(index_type)
    vectors, (name, _, fingerprint) = encode_on_ray(
        [passage_text(p) for p in passages],
        encoder,
        num_encoders=num_encoders,
        encoder_threads=encoder_threads,
        encoder_cpus=encoder_cpus,
        batch_size=batch_size,
        encoder_state=encoder_state,
        show_progress=show_progress,
        check_dim=lambda dim: make_faiss_index(index_type, dim),
    )
    return build_index_from_vectors(
        vectors,
        passages,
        index_root,
        shards=shards,
        index_type=index_type,
        encoder=name,
        encoder_fingerprint=fingerprint,
        publish=publish,
        search_params=search_params,
        show_progress=show_progress,
    )
