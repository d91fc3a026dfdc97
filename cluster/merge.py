"""Merging per-shard top-k lists and their payloads into the global top-k (pure numpy, no Ray)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cluster.shard import ShardHits

MISSING_SCORE = -np.finfo(np.float32).max  # what FAISS reports for an empty inner-product slot


@dataclass
class SearchResult:
    """Global top-k of one query batch, all from one index version."""

    scores: np.ndarray  # (B, k) float32, inner products, descending
    ids: np.ndarray  # (B, k) int64 global passage ids (-1 = no hit)
    titles: list[list[str]]
    texts: list[list[str]]
    vectors: np.ndarray | None  # (B, k, d) float32 document vectors when asked
    version: str
    coverage: float  # fraction of shards that answered (1.0 = full)
    timings: dict[str, float] = field(default_factory=dict)  # total_ms, max_shard_ms
    # provenance (cluster/fusion.py): per slot the retrievers that found it ("dense", "bm25",
    # "dense+bm25") and each one's own score (NaN where its top-N did not hold the passage)
    found_by: np.ndarray | None = None  # (B, k) str
    part_scores: dict[str, np.ndarray] | None = None  # retriever → (B, k) float32


def merge_topk(
    scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Global top-k over shards' (B, k_s) score/id lists (ids -1 = no hit).

    Returns scores (B, k), ids (B, k), and for each slot the part it came from and
    the column in that part (both -1 for an empty slot), so callers can gather payloads.
    """
    if k <= 0:
        raise ValueError(f"k must be ≥ 1, got {k}")
    if not scores or len(scores) != len(ids):
        raise ValueError(f"need one id array per score array, got {len(scores)} and {len(ids)}")
    batch = scores[0].shape[0]
    all_scores = np.concatenate([np.asarray(s, np.float32) for s in scores], axis=1)  # (B, Σk_s)
    all_ids = np.concatenate([np.asarray(i, np.int64) for i in ids], axis=1)  # (B, Σk_s)
    part = np.concatenate([np.full(s.shape[1], p) for p, s in enumerate(scores)])  # (Σk_s,)
    column = np.concatenate([np.arange(s.shape[1]) for s in scores])  # (Σk_s,)
    ranked = np.where(all_ids >= 0, all_scores, -np.inf)  # (B, Σk_s)
    order = np.lexsort((all_ids, -ranked), axis=1)[:, :k]  # (B, k') score desc, then id asc
    pad = k - order.shape[1]
    out_scores = np.full((batch, k), MISSING_SCORE, np.float32)  # (B, k)
    out_ids = np.full((batch, k), -1, np.int64)  # (B, k)
    out_part = np.full((batch, k), -1, np.int64)  # (B, k)
    out_column = np.full((batch, k), -1, np.int64)  # (B, k)
    filled = slice(0, k - pad)
    valid = np.take_along_axis(all_ids, order, axis=1) >= 0  # (B, k')
    out_ids[:, filled] = np.where(valid, np.take_along_axis(all_ids, order, axis=1), -1)
    out_scores[:, filled] = np.where(valid, np.take_along_axis(all_scores, order, axis=1), MISSING_SCORE)
    out_part[:, filled] = np.where(valid, part[order], -1)
    out_column[:, filled] = np.where(valid, column[order], -1)
    return out_scores, out_ids, out_part, out_column


def merge_hits(hits: Sequence[ShardHits], k: int, coverage: float, return_vectors: bool) -> SearchResult:
    """Global top-k of shards' hits (all of one version) with the titles, texts and vectors of the winners."""
    version = hits[0].version
    if any(h.version != version for h in hits):
        raise ValueError(f"cannot merge hits of index versions {sorted({h.version for h in hits})}")
    scores, ids, part, column = merge_topk([h.scores for h in hits], [h.ids for h in hits], k)  # (B, k) each
    slots = [list(zip(part[b].tolist(), column[b].tolist())) for b in range(len(ids))]
    titles = [[hits[p].titles[b][c] if p >= 0 else "" for p, c in row] for b, row in enumerate(slots)]
    texts = [[hits[p].texts[b][c] if p >= 0 else "" for p, c in row] for b, row in enumerate(slots)]
    vectors = _gather_vectors(hits, part, column) if return_vectors else None
    return SearchResult(
        scores=scores,
        ids=ids,
        titles=titles,
        texts=texts,
        vectors=vectors,
        version=version,
        coverage=coverage,
    )


def _gather_vectors(hits: Sequence[ShardHits], part: np.ndarray, column: np.ndarray) -> np.ndarray:
    """The winners' document vectors (B, k, d); zeros in empty slots."""
    stacked = np.concatenate([h.vectors for h in hits], axis=1)  # (B, Σk_s, d)
    offsets = np.cumsum([0] + [h.ids.shape[1] for h in hits])[:-1]  # (S,)
    flat = np.where(part >= 0, offsets[np.maximum(part, 0)] + column, 0)  # (B, k)
    vectors = np.take_along_axis(stacked, flat[:, :, None], axis=1)  # (B, k, d)
    vectors[part < 0] = 0.0
    return vectors
