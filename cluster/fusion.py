"""Which retriever answers (dense, BM25 or both fused), and the fusion: RRF or weighted min-max (no Ray)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Literal

import numpy as np
from pydantic import ConfigDict, Field

from cluster.config import Config
from cluster.merge import MISSING_SCORE, SearchResult

Retriever = Literal["dense", "bm25", "hybrid"]  # the one definition of the setting
Fusion = Literal["rrf", "linear"]
PARTS: dict[str, tuple[str, ...]] = {"dense": ("dense",), "bm25": ("bm25",), "hybrid": ("dense", "bm25")}


class RetrievalConfig(Config):
    """Which retriever finds the passages, how hybrid fuses them, and how BM25 scores become p(z|x).

    p(z|x) is a softmax over the K passages of: scale · q(x)ᵀd(z) for dense and hybrid (hybrid picks
    the K passages by fusion, the dense score weighs them, so training still reaches the query
    encoder), and BM25(x, z) / bm25_temperature for bm25 (the paper's BM25 row: its scores as logits).
    """

    model_config = ConfigDict(frozen=True)
    retriever: Retriever = Field("dense", description="dense | bm25 | hybrid")
    # hybrid: "rrf" (reciprocal rank fusion) or "linear" (weighted min-max); the even linear mix of each
    # retriever's top-10 had the best recall@5 of the settings swept on training-article questions
    # (`python bench/retrievers.py --sweep-only`, docs/retrievers.md)
    fusion: Fusion = "linear"
    rrf_k: float = Field(60.0, gt=0)  # RRF: Σ 1 / (rrf_k + rank)
    alpha: float = Field(0.5, ge=0, le=1)  # linear: alpha · dense + (1 - alpha) · BM25, each min-max scaled
    candidates: int = Field(10, ge=1)  # hybrid: the top-N of each retriever the fusion ranks (k at least)
    bm25_temperature: float = Field(1.0, gt=0)  # bm25: p(z|x) = softmax(BM25 / temperature)

    def depth(self, k: int) -> int:
        """How many hits to ask each retriever for, to return k."""
        return max(k, self.candidates) if self.retriever == "hybrid" else k


def fuse(found: Mapping[str, SearchResult], k: int, config: RetrievalConfig) -> SearchResult:
    """The top-k of `config.retriever` from each part's merged top-N, with provenance (`found_by`,
    `part_scores`). Hybrid `scores` are fusion values (RRF or min-max mix), not similarities."""
    if config.retriever != "hybrid":
        name = config.retriever
        result = found[name]
        hit = result.ids >= 0  # (B, k)
        return replace(
            result,
            found_by=np.where(hit, name, ""),
            part_scores={name: np.where(hit, result.scores, np.nan).astype(np.float32)},
        )
    dense, bm25 = found["dense"], found["bm25"]
    if dense.version != bm25.version:
        raise ValueError(f"cannot fuse hits of index versions {dense.version!r} and {bm25.version!r}")
    rows = [_fuse_row({"dense": dense, "bm25": bm25}, b, k, config) for b in range(len(dense.ids))]
    return _assemble(rows, dense, bm25, k)


def _fuse_row(
    parts: Mapping[str, SearchResult], b: int, k: int, config: RetrievalConfig
) -> list[tuple[int, float, dict[str, tuple[int, float]]]]:
    """Question b's fused top-k: (id, fused value, {part: (column, score)}) best first, ties by id."""
    seen: dict[int, dict[str, tuple[int, float]]] = {}
    for name, result in parts.items():
        for column, (pid, score) in enumerate(zip(result.ids[b].tolist(), result.scores[b].tolist())):
            if pid >= 0:
                seen.setdefault(pid, {})[name] = (column, score)
    fused = {pid: _fused_value(where, parts, b, config) for pid, where in seen.items()}
    best = sorted(fused, key=lambda pid: (-fused[pid], pid))[:k]
    return [(pid, fused[pid], seen[pid]) for pid in best]


def _fused_value(
    where: Mapping[str, tuple[int, float]], parts: Mapping[str, SearchResult], b: int, config: RetrievalConfig
) -> float:
    if config.fusion == "rrf":
        return sum(1.0 / (config.rrf_k + column + 1) for column, _ in where.values())
    weights = {"dense": config.alpha, "bm25": 1.0 - config.alpha}
    return sum(weights[name] * _min_max(score, parts[name], b) for name, (_, score) in where.items())


def _min_max(score: float, result: SearchResult, b: int) -> float:
    """`score` scaled to [0, 1] by the min and max of question b's hits in `result` (1 when all equal)."""
    valid = result.scores[b][result.ids[b] >= 0]
    low, high = float(valid.min()), float(valid.max())
    return 1.0 if math.isclose(high, low) else (score - low) / (high - low)


def _assemble(
    rows: list[list[tuple[int, float, dict[str, tuple[int, float]]]]],
    dense: SearchResult,
    bm25: SearchResult,
    k: int,
) -> SearchResult:
    batch, parts = len(rows), {"dense": dense, "bm25": bm25}
    ids = np.full((batch, k), -1, np.int64)  # (B, k)
    scores = np.full((batch, k), MISSING_SCORE, np.float32)  # (B, k) fusion values
    part_scores = {name: np.full((batch, k), np.nan, np.float32) for name in parts}  # (B, k) each
    found_by = np.full((batch, k), "", dtype=object)  # (B, k)
    titles, texts = [[""] * k for _ in rows], [[""] * k for _ in rows]
    vectors = None if dense.vectors is None else np.zeros((batch, k, dense.vectors.shape[2]), np.float32)
    for b, row in enumerate(rows):
        for slot, (pid, value, where) in enumerate(row):
            ids[b, slot], scores[b, slot] = pid, value
            found_by[b, slot] = "+".join(where)
            for name, (_, score) in where.items():
                part_scores[name][b, slot] = score
            name, (column, _) = next(iter(where.items()))  # the payload from the first part holding it
            titles[b][slot], texts[b][slot] = parts[name].titles[b][column], parts[name].texts[b][column]
            if vectors is not None:
                vectors[b, slot] = parts[name].vectors[b, column]
    return SearchResult(
        scores=scores,
        ids=ids,
        titles=titles,
        texts=texts,
        vectors=vectors,
        version=dense.version,
        coverage=min(dense.coverage, bm25.coverage),
        timings={f"{name}_ms": part.timings.get("total_ms", 0.0) for name, part in parts.items()},
        found_by=found_by.astype(str),
        part_scores=part_scores,
    )
