"""One shard of one index version: memory-mapped FAISS index, passage table, top-k search."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np
from pydantic import ConfigDict, Field

from cluster.bm25 import Bm25Index
from cluster.config import Config
from cluster.index_store import load_manifest
from cluster.shard_cache import cache_dir, shard_files

MMAP_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY  # flat codes map the file


class PassageTable:
    """Titles and texts of one shard: a UTF-8 blob plus (n, 3) offsets, both memory-mapped.

    Passage i has title blob[o[i,0]:o[i,1]] and text blob[o[i,1]:o[i,2]].
    """

    def __init__(self, blob_path: str | Path, offsets_path: str | Path) -> None:
        self.offsets = np.load(offsets_path, mmap_mode="r")  # (n, 3) int64
        size = os.path.getsize(blob_path)
        self.blob = np.memmap(blob_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, row: int) -> tuple[str, str]:
        start, middle, end = (int(x) for x in self.offsets[row])
        return (bytes(self.blob[start:middle]).decode("utf-8"), bytes(self.blob[middle:end]).decode("utf-8"))

    @staticmethod
    def append(
        blob: BinaryIO, pairs: Iterable[tuple[str, str]], offsets: np.ndarray, row: int, position: int
    ) -> tuple[int, int]:
        """Append (title, text) pairs to an open blob, filling offsets from `row`; returns the next
        (row, position), so a table can be written piece by piece."""
        for title, text in pairs:
            title_bytes, text_bytes = title.encode("utf-8"), text.encode("utf-8")
            blob.write(title_bytes + text_bytes)
            end = position + len(title_bytes) + len(text_bytes)
            offsets[row] = (position, position + len(title_bytes), end)
            row, position = row + 1, end
        return row, position

    @staticmethod
    def write(
        blob_path: str | Path, offsets_path: str | Path, titles: Sequence[str], texts: Sequence[str]
    ) -> None:
        offsets = np.zeros((len(titles), 3), dtype=np.int64)  # (n, 3)
        with open(blob_path, "wb") as blob:
            PassageTable.append(blob, zip(titles, texts, strict=True), offsets, 0, 0)
        np.save(offsets_path, offsets)


class SearchConfig(Config):
    """How a shard actor searches: its FAISS threads and search-time parameters, and its file cache."""

    model_config = ConfigDict(frozen=True)
    faiss_threads: int = Field(1, ge=1)
    search_params: dict[str, float] = Field(default_factory=dict)  # e.g. {"efSearch": 128}
    verify_checksums: bool = True  # once per node and file, when fetched or first seen
    cache_dir: str | None = None  # this node's shard file cache (None: see cluster.shard_cache.cache_dir)
    # faiss.cvar.distance_compute_blas_threshold; None keeps FAISS's
    blas_threshold: int | None = Field(None, ge=1)


class ShardConfig(Config):
    """What one shard actor loads, and how it searches."""

    model_config = ConfigDict(frozen=True)
    index_root: str
    version: str
    shard: int = Field(ge=0)
    search: SearchConfig = Field(default_factory=SearchConfig)


@dataclass
class ShardHits:
    """One shard's answer to a query batch; missing hits have id -1."""

    scores: np.ndarray  # (B, k) float32, descending
    ids: np.ndarray  # (B, k) int64 global passage ids
    titles: list[list[str]]
    texts: list[list[str]]
    vectors: np.ndarray | None  # (B, k, d) float32 stored document vectors
    version: str
    shard: int
    search_ms: float


def apply_search_params(index: faiss.Index, params: Mapping[str, float]) -> None:
    """Set FAISS search-time parameters (efSearch, nprobe, k_factor_rf, …) by name."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError as error:
            raise ValueError(
                f"search parameter {name}={value!r} does not apply to this index: {error}"
            ) from error


class Shard:
    """Hosts one shard of one version; a plain class, made a Ray actor by `cluster/replicas.py`
    (`RemoteShard`), whose `ReplicaSet` launches and restarts the replicas a shard group routes to."""

    def __init__(self, config: ShardConfig) -> None:
        self.config = config
        manifest = load_manifest(config.index_root, config.version)
        if config.shard >= len(manifest.shards):
            raise ValueError(
                f"shard {config.shard} not in version {config.version} ({len(manifest.shards)} shards)"
            )
        self.manifest, self.entry = manifest, manifest.shards[config.shard]
        search = config.search
        cache = cache_dir(search.cache_dir)
        paths, self.fetched = shard_files(
            config.index_root, config.version, self.entry, cache, search.verify_checksums
        )
        files = {role: str(path) for role, path in paths.items()}
        faiss.omp_set_num_threads(search.faiss_threads)
        if search.blas_threshold is not None:
            faiss.cvar.distance_compute_blas_threshold = search.blas_threshold
        self.index = faiss.read_index(files["index"], MMAP_FLAGS)
        apply_search_params(self.index, {**manifest.search_params, **search.search_params})
        self.ids = np.load(files["ids"], mmap_mode="r")  # (n,) int64
        self.table = PassageTable(files["passages"], files["offsets"])
        self.vectors = np.load(files["vectors"], mmap_mode="r") if "vectors" in files else None  # (n, d)
        self.bm25 = Bm25Index(files) if "bm25_data" in files else None
        if not (self.index.ntotal == len(self.ids) == len(self.table) == self.entry.count):
            raise ValueError(
                f"shard {config.shard} of {config.version}: index holds {self.index.ntotal} vectors, "
                f"ids {len(self.ids)}, passages {len(self.table)}, manifest {self.entry.count}"
            )

    def _stored_vectors(self, rows: np.ndarray) -> np.ndarray:
        flat = rows.reshape(-1)  # (B*k,)
        out = np.zeros((len(flat), self.manifest.dim), dtype=np.float32)  # (B*k, d)
        valid = flat >= 0
        if self.vectors is not None:
            out[valid] = self.vectors[flat[valid]]
        elif valid.any():
            out[valid] = self.index.reconstruct_batch(flat[valid].astype(np.int64))
        return out.reshape(*rows.shape, self.manifest.dim)  # (B, k, d)

    def search(self, queries: np.ndarray, k: int, return_vectors: bool = False) -> ShardHits:
        """Top-k of this shard for each query row (k is capped at the shard size)."""
        start = time.perf_counter()
        k_local = min(k, self.entry.count)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k_local)  # (B, k)
        return self._hits(scores, rows, return_vectors, start)

    def search_bm25(self, token_lists: list[list[str]], k: int, return_vectors: bool = False) -> ShardHits:
        """BM25 top-k of this shard per tokenised query (corpus-wide statistics: shards merge exactly)."""
        if self.bm25 is None:
            raise ValueError(f"index version {self.config.version} has no BM25 index: rebuild it")
        start = time.perf_counter()
        scores, rows = self.bm25.search(token_lists, min(k, self.entry.count), self.entry.count)  # (B, k)
        return self._hits(scores, rows, return_vectors, start)

    def _hits(self, scores: np.ndarray, rows: np.ndarray, return_vectors: bool, start: float) -> ShardHits:
        ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1).astype(np.int64)  # (B, k)
        pairs = [[self.table.get(r) if r >= 0 else ("", "") for r in row] for row in rows]
        vectors = self._stored_vectors(rows) if return_vectors else None
        return ShardHits(
            scores=scores,
            ids=ids,
            titles=[[title for title, _ in row] for row in pairs],
            texts=[[text for _, text in row] for row in pairs],
            vectors=vectors,
            version=self.config.version,
            shard=self.config.shard,
            search_ms=(time.perf_counter() - start) * 1e3,
        )

    def health(self) -> dict:
        """Raise if the index cannot answer; else describe this replica."""
        probe = np.zeros((1, self.manifest.dim), dtype=np.float32)
        self.index.search(probe, 1)
        return {
            "version": self.config.version,
            "shard": self.config.shard,
            "count": self.entry.count,
            "pid": os.getpid(),
            "node_id": _ray_node_id(),
            "fetched": self.fetched,  # files this replica fetched or checksummed (the first on its node)
            "faiss_threads": faiss.omp_get_max_threads(),
            "blas_threshold": int(faiss.cvar.distance_compute_blas_threshold),
        }


def _ray_node_id() -> str | None:
    """The Ray node hosting this process, when running inside Ray."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
