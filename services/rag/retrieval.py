"""The retrieval path every caller shares: question → query vector → search → doc scores (no Ray)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from cluster.merge import SearchResult

if (
    TYPE_CHECKING
):  # encoders and the model import transformers, which whoever unpickles a Retrieved need not load
    from cluster.encoders import TextEncoder

Search = Callable[
    [np.ndarray, int], SearchResult
]  # (queries (B, d) float32, k) → top-k with document vectors


def closed_book_search(queries: np.ndarray, k: int) -> SearchResult:
    """A Search without an index: one empty passage per question with a zero vector, so the
    generator sees only the question (the closed-book baseline)."""
    n, d = queries.shape
    return SearchResult(
        scores=np.zeros((n, 1), np.float32),
        ids=np.full((n, 1), -1, np.int64),
        titles=[[""] for _ in range(n)],
        texts=[[""] for _ in range(n)],
        vectors=np.zeros((n, 1, d), np.float32),
        version="closed-book",
        coverage=1.0,
    )


@dataclass
class Retrieved:
    """The top-K passages of a batch of questions from one index version, scored as RagModel scores them."""

    ids: np.ndarray  # (B, K) int64 passage ids, -1 where the index has fewer than K passages
    titles: list[list[str]]
    texts: list[list[str]]
    scores: np.ndarray  # (B, K) float32 q(x)ᵀ d(z) as the index ranked them
    doc_scores: np.ndarray  # (B, K) float32 scale · q(x)ᵀ d(z) from the document vectors: what RAG uses
    vectors: np.ndarray | None  # (B, K, d) float32 document vectors, when kept
    version: str
    coverage: float  # fraction of shards that answered
    retrieve_ms: float

    def for_question(self, b: int, k: int) -> Retrieved:
        """Question b's first k hits as a batch of one, without the empty (-1) slots."""
        hit = np.flatnonzero(self.ids[b, :k] >= 0)  # (K',)
        return Retrieved(
            ids=self.ids[b : b + 1, hit],
            titles=[[self.titles[b][i] for i in hit]],
            texts=[[self.texts[b][i] for i in hit]],
            scores=self.scores[b : b + 1, hit],
            doc_scores=self.doc_scores[b : b + 1, hit],
            vectors=None if self.vectors is None else self.vectors[b : b + 1, hit],
            version=self.version,
            coverage=self.coverage,
            retrieve_ms=self.retrieve_ms,
        )

    @classmethod
    def concat(cls, parts: Sequence[Retrieved]) -> Retrieved:
        """Consecutive batches as one; they must come from one index version."""
        versions = sorted({part.version for part in parts})
        if len(versions) != 1:
            raise ValueError(f"the batches come from index versions {versions}, not one")
        kept = [part.vectors for part in parts]
        return cls(
            ids=np.concatenate([part.ids for part in parts]),
            titles=[t for part in parts for t in part.titles],
            texts=[t for part in parts for t in part.texts],
            scores=np.concatenate([part.scores for part in parts]),
            doc_scores=np.concatenate([part.doc_scores for part in parts]),
            vectors=None if any(v is None for v in kept) else np.concatenate(kept),
            version=versions[0],
            coverage=min(part.coverage for part in parts),
            retrieve_ms=sum(part.retrieve_ms for part in parts),
        )


def retrieve(
    query_encoder: TextEncoder,
    search: Search,
    questions: Sequence[str],
    k: int,
    doc_score_scale: float,
    keep_vectors: bool = False,
) -> Retrieved:
    """Encode the questions (no gradient), search the top-k, score the hits from their document vectors.

    Training keeps the vectors and recomputes the doc scores with gradient in its module.
    """
    from services.rag.model import scaled_doc_scores  # here, not on top: see TYPE_CHECKING

    start = time.perf_counter()
    queries = query_encoder.encode(list(questions))  # (B, d)
    found = search(queries, k)
    vectors = torch.tensor(found.vectors)  # (B, K, d) a copy: search results may be read-only
    doc_scores = scaled_doc_scores(torch.from_numpy(queries), vectors, doc_score_scale)  # (B, K)
    return Retrieved(
        ids=found.ids,
        titles=found.titles,
        texts=found.texts,
        scores=found.scores,
        doc_scores=doc_scores.numpy(),
        vectors=found.vectors if keep_vectors else None,
        version=found.version,
        coverage=found.coverage,
        retrieve_ms=(time.perf_counter() - start) * 1e3,
    )
