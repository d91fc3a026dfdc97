"""Planning a streaming build: bytes per vector, chunk/block/sample sizes from a worker memory budget,
the refusal of a plan that cannot fit, and the fingerprint that names the build's work directory."""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import NamedTuple

import faiss

from cluster.index_build import make_faiss_index, shard_bounds

WORKER_BASE = 768 << 20  # bytes a build worker holds before any data: interpreter, torch, faiss, model
TEXT_BYTES = 2048  # bytes a 100-word passage takes in a worker (str objects, tokens), generously
CHUNK_MAX = 16_384  # passages per encoding chunk: a chunk is the unit of work that resume skips
PER_LIST = 100  # training vectors per IVF list (FAISS asks for 39 to 256)
PQ_TRAIN = 256 * 100  # and per PQ codebook: 2^8 centroids × 100
MIN_PER_LIST = 39
ROW_OVERHEAD = 8 + 24  # per vector in an add task besides its code: id (int64) + passage offsets (3 × int64)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """'4GiB', '512MiB', '2G', '1000000' → bytes; ValueError naming a bad value."""
    if isinstance(text, int) and text > 0:
        return text
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"bad memory size {text!r}: expected e.g. '4GiB', '512MiB' or a byte count")
    unit = (match.group(2) or "").upper()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def gib(count: float) -> str:
    return f"{count / (1 << 30):.2f} GiB"


def bytes_per_vector(index_type: str, dim: int) -> float:
    """Bytes one added vector takes in an index of this type (codes, graph links, list ids)."""
    index = make_faiss_index(index_type, dim)  # owns the sub-indexes: keep it alive while they are read
    return _index_bytes(faiss.downcast_index(index))


def _index_bytes(index: faiss.Index) -> float:
    if isinstance(index, faiss.IndexPreTransform):
        return _index_bytes(faiss.downcast_index(index.index))
    if isinstance(index, faiss.IndexRefine):
        base, refine = faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)
        return _index_bytes(base) + _index_bytes(refine)
    if isinstance(index, faiss.IndexHNSW):
        links = index.hnsw.nb_neighbors(0) * 4 * 1.07  # level 0 holds 2M int32 links; upper levels ~7 %
        return _index_bytes(faiss.downcast_index(index.storage)) + links + 12  # + level and offset
    if isinstance(index, faiss.IndexIVF):
        return index.code_size + 8  # code + its id in the inverted list
    if hasattr(index, "code_size"):
        return float(index.code_size)  # flat codes: Flat, SQ, PQ
    raise ValueError(f"cannot size index type {type(index).__name__}: give a FAISS factory string")


def train_rows(index_type: str, dim: int, count: int) -> tuple[int, int]:
    """(wanted, fewest) vectors to train on, after FAISS's guidance: PER_LIST per IVF list (at least
    MIN_PER_LIST), PQ_TRAIN for PQ codebooks; (0, 0) for an index that needs no training."""
    if make_faiss_index(index_type, dim).is_trained:
        return 0, 0
    lists = int(m.group(1)) if (m := re.search(r"IVF(\d+)", index_type)) else 0
    wanted = max(PER_LIST * lists, PQ_TRAIN if "PQ" in index_type else 0, 10_000)
    return min(count, wanted), min(count, MIN_PER_LIST * lists)


class BuildPlan(NamedTuple):
    """Sizes a build uses. Chunk rows follow from the budget and enter the fingerprint; an add task
    adds one chunk's rows at a time, so the chunk is also the add block."""

    count: int
    dim: int
    index_type: str
    shards: int
    budget: int
    chunk_rows: int
    train_rows: int
    bytes_per_vector: float

    def worker_bytes(self) -> dict[str, int]:
        """Estimated peak data bytes of each kind of build worker (besides WORKER_BASE)."""
        shard = max(b - a for a, b in shard_bounds(self.count, self.shards))
        return {
            "encode": self.chunk_rows * (self.dim * 4 + TEXT_BYTES),
            "train": int(self.train_rows * self.dim * 4 * 2),  # sample + k-means' copy
            "add": int(shard * (self.bytes_per_vector + ROW_OVERHEAD) + self.chunk_rows * self.dim * 4 * 2),
        }


def plan_build(count: int, dim: int, index_type: str, shards: int, budget: int) -> BuildPlan:
    """Chunk/block sizes that fit `budget` bytes per worker; ValueError naming the bytes when a
    shard, the training sample or one chunk cannot fit."""
    data = budget - WORKER_BASE
    if data <= 0:
        raise ValueError(
            f"--max-worker-memory {gib(budget)} is below the {gib(WORKER_BASE)} a build worker holds "
            "before any data"
        )
    shard_bounds(count, shards)
    chunk = max(1, min(CHUNK_MAX, data // 4 // (dim * 4 + TEXT_BYTES)))
    wanted, fewest = train_rows(index_type, dim, count)
    rows = max(fewest, min(wanted, data // (dim * 4 * 2)))
    plan = BuildPlan(count, dim, index_type, shards, budget, chunk, rows, bytes_per_vector(index_type, dim))
    _refuse_if_over(plan, data)
    return plan


def _refuse_if_over(plan: BuildPlan, data: int) -> None:
    need = plan.worker_bytes()
    if need["add"] > data:
        shard = max(b - a for a, b in shard_bounds(plan.count, plan.shards))
        per = plan.bytes_per_vector + ROW_OVERHEAD
        fewest = math.ceil(plan.count * per / max(1, data - plan.chunk_rows * plan.dim * 8))
        raise ValueError(
            f"a shard of index type {plan.index_type!r} needs {need['add']:,} bytes ({gib(need['add'])}: "
            f"{shard:,} vectors × {per:.0f} bytes + one add block) but --max-worker-memory is "
            f"{plan.budget:,} bytes ({gib(plan.budget)}, {gib(WORKER_BASE)} of it held for the worker "
            f"itself); use at least {fewest} --shards or a larger budget"
        )
    if need["train"] > data:
        raise ValueError(
            f"training {plan.index_type!r} on {plan.train_rows:,} vectors needs {need['train']:,} bytes "
            f"({gib(need['train'])}) but --max-worker-memory leaves {data:,} bytes ({gib(data)}) for data"
        )


def fingerprint(parts: dict[str, object]) -> str:
    """A stable 16-hex-digit hash of what decides a build's files (corpus, encoder, index, chunking)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
