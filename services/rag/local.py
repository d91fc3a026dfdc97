"""Single-process RAG without Ray: one flat FAISS index over a corpus, cached document vectors."""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from cluster.encoders import TextEncoder, load_encoders
from cluster.passages import Passage, load_corpus, passage_text
from services.rag.generator import make_generator
from services.rag.loading import cache_root, ensure_cached, load_generator
from services.rag.model import RagModel

MODES = ("sequence", "token")
DECODINGS = ("thorough", "fast")
ENCODE_CHUNK = 1024  # passages per progress line


@dataclass(frozen=True)
class LocalConfig:
    """What `rayrag ask --local` loads and how it answers."""

    corpus: str = "default"
    limit: int | None = None
    encoder: str = "default"
    doc_encoder: str | None = None  # None: the same model as the query encoder
    generator: str = "default"
    n_docs: int = 5
    mode: str = "sequence"
    decoding: str = "fast"  # RAG-Sequence; "thorough" rescores every hypothesis under all K
    num_beams: int = 4
    max_new_tokens: int = 32
    cache_dir: str | None = None  # None: $RAYRAG_CACHE or ~/.cache/rayrag

    def __post_init__(self) -> None:
        if self.n_docs < 1:
            raise ValueError(f"n_docs must be ≥ 1, got {self.n_docs}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {self.decoding!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be ≥ 1 or None, got {self.limit}")


@dataclass(frozen=True)
class Source:
    """One retrieved passage behind an answer; `score` is the raw inner product q·d."""

    id: int
    title: str
    text: str
    score: float


@dataclass(frozen=True)
class Answer:
    question: str
    answer: str
    sources: list[Source]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _encode_with_progress(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    parts = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        parts.append(encoder.encode(texts[start : start + ENCODE_CHUNK]))
        _log(f"encoded {min(start + ENCODE_CHUNK, len(texts))}/{len(texts)} passages")
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
        _log(f"encoding {len(texts)} passages with {encoder.name!r} (cached afterwards in {target})")
        np.save(out / "vectors.npy", _encode_with_progress(encoder, texts))

    vectors = np.load(ensure_cached(target, build) / "vectors.npy")
    assert vectors.shape == (len(passages), encoder.dim), vectors.shape
    return vectors


class LocalRag:
    """Retrieve the top-K passages for a question from one `IndexFlatIP`, answer with `RagModel`."""

    def __init__(self, passages: list[Passage], config: LocalConfig = LocalConfig()) -> None:
        if config.n_docs > len(passages):
            raise ValueError(f"n_docs={config.n_docs} exceeds the corpus size of {len(passages)} passages")
        self.config, self.passages = config, passages
        query_encoder, doc_encoder = load_encoders(config.encoder, config.doc_encoder)
        self.vectors = document_vectors(passages, doc_encoder, config.cache_dir)  # (N, d)
        self.index = faiss.IndexFlatIP(self.vectors.shape[1])
        self.index.add(self.vectors)
        model, tokenizer = load_generator(config.generator, config.cache_dir)
        self.rag = RagModel(query_encoder.eval(), make_generator(model, tokenizer)).eval()

    @classmethod
    def from_config(cls, config: LocalConfig) -> "LocalRag":
        return cls(load_corpus(config.corpus, config.limit), config)

    def retrieve(self, questions: list[str]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Query vectors (B, d), inner products (B, K) best first, and rows into `passages` (B, K)."""
        with torch.no_grad():
            queries = self.rag.encode_queries(questions)  # (B, d)
        scores, rows = self.index.search(queries.numpy().astype(np.float32), self.config.n_docs)
        return queries, scores, rows

    def ask(self, questions: list[str]) -> list[Answer]:
        """Answer each question from its top-K passages, with those passages as sources."""
        queries, scores, rows = self.retrieve(questions)
        doc_vectors = torch.from_numpy(self.vectors[rows])  # (B, K, d)
        doc_scores = self.rag.doc_scores(queries, doc_vectors)  # (B, K)
        found = [[self.passages[r] for r in row] for row in rows]
        cfg = self.config
        texts = self.rag.generate(
            questions,
            titles=[[p.title for p in docs] for docs in found],
            texts=[[p.text for p in docs] for docs in found],
            doc_scores=doc_scores,
            mode=cfg.mode,
            decoding=cfg.decoding,
            num_beams=cfg.num_beams,
            max_new_tokens=cfg.max_new_tokens,
        )
        return [
            Answer(q, text.strip(), [Source(p.id, p.title, p.text, float(s)) for p, s in zip(docs, row)])
            for q, text, docs, row in zip(questions, texts, found, scores)
        ]
