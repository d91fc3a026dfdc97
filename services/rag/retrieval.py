"""The retrieval path every caller shares: question → query vector → search → doc scores (no Ray)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cluster.fusion import PARTS, RetrievalConfig, fuse
from cluster.merge import SearchResult

if (
    TYPE_CHECKING
):  # encoders and the model import transformers, which whoever unpickles a Retrieved need not load
    from cluster.encoders import TextEncoder

Search = Callable[[np.ndarray, Sequence[str], int, tuple[str, ...]], Mapping[str, SearchResult]]
# (queries (B, d) float32, questions, k, parts ⊆ ("dense", "bm25")) → each part's top-k with document
# vectors, all from one index version
DENSE = RetrievalConfig()


def group_search(group: Any) -> Search:
    """A Search over a ShardGroup (or anything with its `search_retrievers`), document vectors included."""
    return lambda queries, questions, k, parts: group.search_retrievers(
        queries, questions, k, parts, return_vectors=True
    )


def closed_book_search(
    queries: np.ndarray, questions: Sequence[str], k: int, parts: tuple[str, ...]
) -> dict[str, SearchResult]:
    """A Search without an index: one empty passage per question with a zero vector, so the
    generator sees only the question (the closed-book baseline)."""
    n, d = queries.shape
    empty = SearchResult(
        scores=np.zeros((n, 1), np.float32),
        ids=np.full((n, 1), -1, np.int64),
        titles=[[""] for _ in range(n)],
        texts=[[""] for _ in range(n)],
        vectors=np.zeros((n, 1, d), np.float32),
        version="closed-book",
        coverage=1.0,
    )
    return dict.fromkeys(parts, empty)


@dataclass
class Retrieved:
    """The top-K passages of a batch of questions from one index version, scored as RagModel scores them."""

    ids: np.ndarray  # (B, K) int64 passage ids, -1 where the index has fewer than K passages
    titles: list[list[str]]
    texts: list[list[str]]
    scores: np.ndarray  # (B, K) float32 what ranked them: q(x)ᵀ d(z), BM25, or hybrid's fusion value
    doc_scores: np.ndarray  # (B, K) float32 the logits of p(z|x) (RetrievalConfig says which): what RAG uses
    vectors: np.ndarray | None  # (B, K, d) float32 document vectors, when kept
    version: str
    coverage: float  # fraction of shards that answered
    retrieve_ms: float
    retriever: str = "dense"
    found_by: np.ndarray | None = None  # (B, K) str: "dense", "bm25" or "dense+bm25"
    part_scores: dict[str, np.ndarray] | None = None  # "dense"/"bm25" → (B, K) own scores, NaN: not found

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
            retriever=self.retriever,
            found_by=None if self.found_by is None else self.found_by[b : b + 1, hit],
            part_scores=None
            if self.part_scores is None
            else {name: part[b : b + 1, hit] for name, part in self.part_scores.items()},
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
            retriever=parts[0].retriever,
            found_by=_concat_or_none([part.found_by for part in parts]),
            part_scores=_concat_parts([part.part_scores for part in parts]),
        )


def _concat_or_none(arrays: Sequence[np.ndarray | None]) -> np.ndarray | None:
    return None if any(a is None for a in arrays) else np.concatenate(arrays)


def _concat_parts(parts: Sequence[dict[str, np.ndarray] | None]) -> dict[str, np.ndarray] | None:
    if any(part is None for part in parts):
        return None
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def retrieve(
    query_encoder: TextEncoder,
    search: Search,
    questions: Sequence[str],
    k: int,
    doc_score_scale: float,
    keep_vectors: bool = False,
    retrieval: RetrievalConfig = DENSE,
) -> Retrieved:
    """Encode the questions (no gradient), search the top-k of `retrieval.retriever`, and score the hits.

    Doc scores (the logits of p(z|x)): scale · q(x)ᵀd(z) from the document vectors for dense and hybrid,
    BM25 / bm25_temperature for bm25 (0 in empty slots: a passage without a query term scores 0).
    Training keeps the vectors and recomputes the dense doc scores with gradient in its module.
    """
    from services.rag.model import scaled_doc_scores  # here, not on top: see TYPE_CHECKING

    start = time.perf_counter()
    queries = query_encoder.encode(list(questions))  # (B, d)
    parts = search(queries, list(questions), retrieval.depth(k), PARTS[retrieval.retriever])
    found = fuse(parts, k, retrieval)
    if retrieval.retriever == "bm25":
        doc_scores = np.where(found.ids >= 0, found.scores / retrieval.bm25_temperature, 0.0)  # (B, K)
    else:
        vectors = torch.tensor(found.vectors)  # (B, K, d) a copy: search results may be read-only
        doc_scores = scaled_doc_scores(torch.from_numpy(queries), vectors, doc_score_scale).numpy()  # (B, K)
    return Retrieved(
        ids=found.ids,
        titles=found.titles,
        texts=found.texts,
        scores=found.scores,
        doc_scores=doc_scores.astype(np.float32),
        vectors=found.vectors if keep_vectors else None,
        version=found.version,
        coverage=found.coverage,
        retrieve_ms=(time.perf_counter() - start) * 1e3,
        retriever=retrieval.retriever,
        found_by=found.found_by,
        part_scores=found.part_scores,
    )
