"""Provenance in every answer: the retrieved passages of a question as the API's `Doc`s."""

from __future__ import annotations

import numpy as np
import torch

from services.rag.retrieval import Retrieved
from services.serving.api import Doc


def docs_of(found: Retrieved) -> list[Doc]:
    """Provenance of one question: its docs with their doc scores and p(z|x) = softmax(doc scores)."""
    from services.rag.marginal import doc_log_probs

    probs = doc_log_probs(torch.from_numpy(found.doc_scores)).exp()[0]  # (K,)
    parts = found.part_scores or {}
    return [
        Doc(
            id=int(found.ids[0, j]),
            title=found.titles[0][j],
            text=found.texts[0][j],
            score=float(found.doc_scores[0, j]),
            prob=float(probs[j]),
            retriever=str(found.found_by[0, j]) if found.found_by is not None else found.retriever,
            dense_score=_finite(parts["dense"][0, j]) if "dense" in parts else None,
            bm25_score=_finite(parts["bm25"][0, j]) if "bm25" in parts else None,
            fused_score=float(found.scores[0, j]) if found.retriever == "hybrid" else None,
        )
        for j in range(len(found.titles[0]))
    ]


def _finite(value: float) -> float | None:
    """A retriever's own score, or None where its top-N did not hold the passage (NaN)."""
    return None if np.isnan(value) else float(value)
