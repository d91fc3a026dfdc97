"""Merging per-shard top-k lists into the global top-k (pure numpy, no Ray)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MISSING_SCORE = -np.finfo(np.float32).max  # what FAISS reports for an empty inner-product slot


def merge_topk(scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int
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
