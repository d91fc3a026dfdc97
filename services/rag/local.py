"""Single-process RAG without Ray: one flat FAISS index (and BM25) over a corpus, cached on disk."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from pydantic import ConfigDict, Field

from cluster.bm25 import Bm25Index, Bm25Params, build_shards, shard_files, tokenize
from cluster.encoders import TextEncoder
from cluster.fusion import RetrievalConfig
from cluster.merge import SearchResult
from cluster.passages import Passage, load_corpus, passage_text
from services.rag.config import DecodingConfig, ModelsConfig
from services.rag.loading import cache_root, ensure_cached, load_rag
from services.rag.retrieval import Retrieved, retrieve

ENCODE_CHUNK = 1024  # passages per progress line
LOCAL_VERSION = "local"  # the version a local, in-memory index reports

logger = logging.getLogger(__name__)


class LocalConfig(DecodingConfig, ModelsConfig):
    """What `rayrag ask --local` loads (the corpus, the models) and how it answers."""

    model_config = ConfigDict(frozen=True)
    corpus: str = Field("default", description="default | squad-open | FILE.jsonl | FILE.json")
    limit: int | None = Field(None, ge=1, description="use only the first N passages")
    cache_dir: str | None = Field(
        None, description="converted models and vectors (default $RAYRAG_CACHE, else ~/.cache/rayrag)"
    )
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)  # dense, bm25 or hybrid


@dataclass(frozen=True)
class Source:
    """One retrieved passage behind an answer: `score` is what ranked it (q·d, BM25, or hybrid's
    fusion value), `found_by` the retriever(s) that found it."""

    id: int
    title: str
    text: str
    score: float
    found_by: str


@dataclass(frozen=True)
class Answer:
    question: str
    answer: str
    sources: list[Source]


def _encode_with_progress(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    parts = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        parts.append(encoder.encode(texts[start : start + ENCODE_CHUNK]))
        logger.info(f"encoded {min(start + ENCODE_CHUNK, len(texts))}/{len(texts)} passages")
    return np.concatenate(parts)  # (N, d)


def document_vectors(
    passages: list[Passage], encoder: TextEncoder, cache_dir: str | None = None
) -> np.ndarray:
    """(N, d) float32 vectors of the passages, cached on disk by encoder fingerprint + corpus."""
    texts = [passage_text(p) for p in passages]
    digest = hashlib.sha256(encoder.fingerprint().encode())
    for passage, text in zip(passages, texts):
        digest.update(f"{passage.id}\0{text}\0".encode())
    target = cache_root(cache_dir) / "vectors" / digest.hexdigest()[:24]

    def build(out: Path) -> None:
        logger.info(f"encoding {len(texts)} passages with {encoder.name!r} (cached afterwards in {target})")
        np.save(out / "vectors.npy", _encode_with_progress(encoder, texts))

    vectors = np.load(ensure_cached(target, build) / "vectors.npy")
    assert vectors.shape == (len(passages), encoder.dim), vectors.shape
    return vectors


def bm25_index(
    passages: list[Passage], params: Bm25Params = Bm25Params(), cache_dir: str | None = None
) -> Bm25Index:
    """The passages' BM25 as one shard (cluster/bm25.py), cached on disk by settings + corpus."""
    digest = hashlib.sha256(params.model_dump_json().encode())
    for passage in passages:
        digest.update(f"{passage.id}\0{passage_text(passage)}\0".encode())
    target = cache_root(cache_dir) / "bm25" / digest.hexdigest()[:24]

    def build(out: Path) -> None:
        texts = [passage_text(p) for p in passages]
        build_shards(out, [lambda: [texts]], params)

    directory = ensure_cached(target, build)
    return Bm25Index({role: str(directory / name) for role, name in shard_files(0).items()})


class LocalRag:
    """Retrieve the top-K passages for a question from one `IndexFlatIP`, answer with `RagModel`."""

    def __init__(self, passages: list[Passage], config: LocalConfig = LocalConfig()) -> None:
        if config.n_docs > len(passages):
            raise ValueError(f"n_docs={config.n_docs} exceeds the corpus size of {len(passages)} passages")
        self.config, self.passages = config, passages
        doc_encoder = TextEncoder.from_pretrained(config.doc_encoder)
        self.vectors = document_vectors(passages, doc_encoder, config.cache_dir)  # (N, d)
        self.index = faiss.IndexFlatIP(self.vectors.shape[1])
        self.index.add(self.vectors)
        self.bm25 = (
            bm25_index(passages, cache_dir=config.cache_dir)
            if config.retrieval.retriever != "dense"
            else None
        )
        self.rag = load_rag(config, cache_dir=config.cache_dir)

    @classmethod
    def from_config(cls, config: LocalConfig) -> LocalRag:
        return cls(load_corpus(config.corpus, config.limit), config)

    def search(
        self, queries: np.ndarray, questions: list[str], k: int, parts: tuple[str, ...]
    ) -> dict[str, SearchResult]:
        """Each part's top-k ("dense": the flat index over query rows (B, d); "bm25": the questions'
        terms), with the passages and their vectors."""
        found = {}
        if "dense" in parts:
            found["dense"] = self._result(*self.index.search(queries, k))
        if "bm25" in parts:
            tokens = tokenize(questions, Bm25Params())
            found["bm25"] = self._result(
                *self.bm25.search(tokens, min(k, len(self.passages)), len(self.passages))
            )
        return found

    def _result(self, scores: np.ndarray, rows: np.ndarray) -> SearchResult:
        """Hits of (B, k) rows (-1: none) as a SearchResult with titles, texts and vectors."""
        found = [[self.passages[r] if r >= 0 else None for r in row] for row in rows]
        return SearchResult(
            scores=scores,
            ids=np.array([[p.id if p else -1 for p in docs] for docs in found], np.int64),
            titles=[[p.title if p else "" for p in docs] for docs in found],
            texts=[[p.text if p else "" for p in docs] for docs in found],
            vectors=np.where(rows[:, :, None] >= 0, self.vectors[np.maximum(rows, 0)], 0.0),  # (B, k, d)
            version=LOCAL_VERSION,
            coverage=1.0,
        )

    def retrieve(self, questions: list[str]) -> Retrieved:
        """The top-K passages of each question with their doc scores."""
        cfg = self.config
        return retrieve(
            self.rag.query_encoder,
            self.search,
            questions,
            cfg.n_docs,
            self.rag.doc_score_scale,
            retrieval=cfg.retrieval,
        )

    def ask(self, questions: list[str]) -> list[Answer]:
        """Answer each question from its top-K passages, with those passages as sources."""
        found = self.retrieve(questions)
        cfg = self.config
        answers = self.rag.generate(
            questions, titles=found.titles, texts=found.texts, doc_scores=found.doc_scores, options=cfg
        )
        sources = zip(
            found.ids, found.titles, found.texts, found.scores, found.found_by
        )  # per question: (K,)
        return [
            Answer(
                question,
                answer.strip(),
                [Source(int(i), t, x, float(s), str(by)) for i, t, x, s, by in zip(*hits)],
            )
            for question, answer, hits in zip(questions, answers, sources)
        ]
