"""BM25 beside the dense index: tokens (bm25s + PyStemmer), corpus-wide statistics, per-shard weights, search.

Scores are Lucene's BM25, the variant bm25s calls "lucene": idf = ln(1 + (N - df + 0.5) / (df + 0.5)) times
tf / (tf + k1 (1 - b + b dl/avgdl)). N, df and avgdl are corpus-wide, as Elasticsearch's dfs_query_then_fetch
makes them, so a shard's scores equal one index's over every passage and per-shard top-k lists merge exactly.
bm25s computes idf from the corpus it indexes and has no public way to take corpus-wide statistics, so it
does the tokenising and stemming here and each shard's (passages × terms) weight matrix is built with
scipy.sparse. Pure module: no Ray.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import bm25s
import numpy as np
import scipy.sparse as sp
from pydantic import ConfigDict, Field

from cluster.config import Config
from cluster.index_store import Manifest, ShardManifest, sha256_file
from cluster.passages import Passage, passage_text

FILES = ("bm25_data", "bm25_rows", "bm25_indptr", "bm25_vocab")  # roles in a shard's manifest entry


class Bm25Params(Config):
    """How passages and questions become terms, and BM25's k1 and b."""

    model_config = ConfigDict(frozen=True)
    k1: float = Field(1.5, ge=0)
    b: float = Field(0.75, ge=0, le=1)
    stemmer: str | None = "english"  # a PyStemmer language; None: no stemming
    # a bm25s stop-word list (en_plus: NLTK's 179 English words; en: 33) or None to keep every word;
    # en_plus had the better BM25 recall@5 on training-article questions (docs/retrievers.md)
    stopwords: str | None = "en_plus"
    lower: bool = True


@functools.lru_cache(maxsize=4)
def _stemmer(language: str | None):  # noqa: ANN202 (PyStemmer has no type hints)
    if language is None:
        return None
    import Stemmer

    return Stemmer.Stemmer(language)


def tokenize(texts: Sequence[str], params: Bm25Params) -> list[list[str]]:
    """Each text's terms (lower-cased, stop words dropped, stemmed), in order and with repeats."""
    return bm25s.tokenize(
        list(texts),
        lower=params.lower,
        stopwords=params.stopwords or [],
        stemmer=_stemmer(params.stemmer),
        return_ids=False,
        show_progress=False,
    )


class ShardCounts:
    """Pass one over one shard: raw term counts (passages × shard-local terms) and passage lengths."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.lengths: list[int] = []

    def add(self, token_lists: Iterable[Sequence[str]]) -> None:
        for tokens in token_lists:
            row = len(self.lengths)
            for token in tokens:
                self.rows.append(row)
                self.cols.append(self.vocab.setdefault(token, len(self.vocab)))
            self.lengths.append(len(tokens))

    def matrix(self) -> sp.csc_matrix:
        """(n, V_shard) term counts, columns in vocabulary order."""
        ones = np.ones(len(self.rows), np.float64)
        shape = (len(self.lengths), len(self.vocab))
        return sp.csc_matrix((ones, (np.array(self.rows, np.int64), np.array(self.cols, np.int64))), shape)

    def doc_freqs(self) -> dict[str, int]:
        """Per term, how many of this shard's passages hold it."""
        df = np.diff(self.matrix().indptr)  # (V_shard,) nonzeros per column = passages with the term
        return dict(zip(self.vocab, df.tolist()))


class CorpusStats:
    """Corpus-wide N, document frequencies and total length, summed over shards' counts."""

    def __init__(self) -> None:
        self.count = 0
        self.total_length = 0
        self.df: dict[str, int] = {}

    def add(self, shard: ShardCounts) -> None:
        self.count += len(shard.lengths)
        self.total_length += sum(shard.lengths)
        for term, n in shard.doc_freqs().items():
            self.df[term] = self.df.get(term, 0) + n

    @property
    def avgdl(self) -> float:
        return self.total_length / self.count if self.count else 0.0

    def idf(self, term: str) -> float:
        """Lucene's idf, computed term by term (math.log: the same bits whatever the shard layout)."""
        df = self.df[term]
        return math.log(1.0 + (self.count - df + 0.5) / (df + 0.5))

    def describe(self, params: Bm25Params) -> dict:
        """What the manifest records about the BM25 side of a version."""
        return {
            "params": params.model_dump(),
            "count": self.count,
            "avgdl": self.avgdl,
            "terms": len(self.df),
        }


def shard_weights(counts: ShardCounts, stats: CorpusStats, params: Bm25Params) -> sp.csc_matrix:
    """(n, V_shard) float32 BM25 weights w(d, t) = idf(t) · tf / (tf + k1 (1 - b + b dl/avgdl))."""
    tf = counts.matrix()  # (n, V) csc, float64
    lengths = np.asarray(counts.lengths, np.float64)  # (n,)
    norm = params.k1 * (1.0 - params.b + params.b * lengths / max(stats.avgdl, 1e-12))  # (n,)
    idf = np.array([stats.idf(term) for term in counts.vocab], np.float64)  # (V,)
    column = np.repeat(np.arange(tf.shape[1]), np.diff(tf.indptr))  # (nnz,) term of each entry
    data = idf[column] * tf.data / (tf.data + norm[tf.indices])  # (nnz,)
    return sp.csc_matrix((data.astype(np.float32), tf.indices, tf.indptr), tf.shape)


def shard_files(shard: int) -> dict[str, str]:
    """Role → file name of shard `shard`'s BM25 files."""
    suffix = {role: "txt" if role == "bm25_vocab" else "npy" for role in FILES}
    return {role: f"{role.replace('_', '-')}-{shard}.{suffix[role]}" for role in FILES}


def write_shard(directory: Path, shard: int, counts: ShardCounts, weights: sp.csc_matrix) -> dict[str, str]:
    """Write one shard's weight matrix and its term list; returns role → file name."""
    files = shard_files(shard)
    np.save(directory / files["bm25_data"], weights.data.astype(np.float32))
    np.save(directory / files["bm25_rows"], weights.indices.astype(np.int32))
    np.save(directory / files["bm25_indptr"], weights.indptr.astype(np.int64))
    (directory / files["bm25_vocab"]).write_text("\n".join(counts.vocab), encoding="utf-8")
    return files


def build_shards(
    directory: Path, shards: Sequence[Callable[[], Iterable[Sequence[str]]]], params: Bm25Params
) -> tuple[dict, list[dict[str, str]]]:
    """Two passes over each shard's text chunks: counts and corpus statistics, then per-shard weights.

    `shards[s]()` yields shard s's passage texts in chunks, in id order (called once per pass: the
    counts are not kept between passes, so memory holds one shard and the corpus's term table).
    Returns the manifest's BM25 description and each shard's files.
    """
    stats = CorpusStats()
    for chunks in shards:
        stats.add(_count(chunks(), params))
    files = []
    for shard, chunks in enumerate(shards):
        counts = _count(chunks(), params)
        files.append(write_shard(directory, shard, counts, shard_weights(counts, stats, params)))
    return stats.describe(params), files


def _count(chunks: Iterable[Sequence[str]], params: Bm25Params) -> ShardCounts:
    counts = ShardCounts()
    for texts in chunks:
        counts.add(tokenize(texts, params))
    return counts


class Bm25Index:
    """One shard's BM25 weights (memory-mapped) answering top-k for tokenised queries."""

    def __init__(self, files: Mapping[str, str]) -> None:
        self.data = np.load(files["bm25_data"], mmap_mode="r")  # (nnz,) float32
        self.rows = np.load(files["bm25_rows"], mmap_mode="r")  # (nnz,) int32
        self.indptr = np.load(files["bm25_indptr"], mmap_mode="r")  # (V+1,) int64
        text = Path(files["bm25_vocab"]).read_text(encoding="utf-8")
        self.vocab = {term: col for col, term in enumerate(text.split("\n"))} if text else {}

    def scores(self, tokens: Sequence[str], count: int) -> np.ndarray:
        """(count,) float32 BM25 score of every passage: the query's terms added in query order."""
        acc = np.zeros(count, np.float32)  # (n,)
        for token in tokens:
            col = self.vocab.get(token)
            if col is not None:
                start, end = int(self.indptr[col]), int(self.indptr[col + 1])
                acc[self.rows[start:end]] += self.data[start:end]  # rows are unique within a column
        return acc

    def search(
        self, token_lists: Sequence[Sequence[str]], k: int, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (B, k) float32, rows (B, k) int64) per query; -1 rows past the matching passages.

        Ties go to the lower row, as `cluster.merge.merge_topk` breaks them by id."""
        scores = np.zeros((len(token_lists), k), np.float32)  # (B, k)
        rows = np.full((len(token_lists), k), -1, np.int64)  # (B, k)
        for b, tokens in enumerate(token_lists):
            found, top = top_rows(self.scores(tokens, count), k)
            scores[b, : len(top)], rows[b, : len(top)] = found, top
        return scores, rows


def top_rows(acc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best positive entries of `acc` (score descending, then position ascending)."""
    candidates = np.flatnonzero(acc > 0)  # (m,)
    if len(candidates) > k:
        kth = np.partition(acc[candidates], len(candidates) - k)[len(candidates) - k]
        candidates = candidates[acc[candidates] >= kth]  # the k best and their ties
    order = np.lexsort((candidates, -acc[candidates]))[:k]
    return acc[candidates[order]], candidates[order].astype(np.int64)


def add_to_entries(
    directory: Path,
    shards: Sequence[Callable[[], Iterable[Sequence[str]]]],
    entries: Sequence[ShardManifest],
    params: Bm25Params = Bm25Params(),
) -> tuple[dict, tuple[ShardManifest, ...]]:
    """Build BM25 into `directory` from each shard's text chunks (as `build_shards` takes them) and return
    the manifest's BM25 description and `entries` with the BM25 files and their checksums added."""
    described, files = build_shards(directory, shards, params)
    return described, tuple(
        replace(
            entry,
            files=entry.files | names,
            sha256=entry.sha256 | {name: sha256_file(directory / name) for name in names.values()},
        )
        for entry, names in zip(entries, files, strict=True)
    )


def add_to_version(
    directory: Path,
    passages: Sequence[Passage],
    entries: Sequence[ShardManifest],
    params: Bm25Params = Bm25Params(),
    chunk: int = 4096,
) -> tuple[dict, tuple[ShardManifest, ...]]:
    """`add_to_entries` for a staged version in `directory` whose passages are all in memory."""
    starts = np.cumsum([0] + [entry.count for entry in entries])  # shard s holds rows starts[s]:starts[s+1]

    def chunks(start: int, end: int) -> Callable[[], Iterable[list[str]]]:
        return lambda: (
            [passage_text(p) for p in passages[i : min(i + chunk, end)]] for i in range(start, end, chunk)
        )

    shards = [chunks(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    return add_to_entries(directory, shards, entries, params)


def query_tokens(questions: Sequence[str], manifest: Manifest) -> list[list[str]]:
    """The questions' terms under the version's own BM25 settings; ValueError when it has no BM25."""
    if manifest.bm25 is None:
        raise ValueError(f"index version {manifest.version!r} has no BM25 index: rebuild it")
    return tokenize(questions, Bm25Params(**manifest.bm25["params"]))
