"""Retriever benchmark: dense, BM25 and hybrid on the experiment's SQuAD test questions over its corpus.

Builds the cpu preset's data (training/presets/cpu.yaml: held-out articles' questions; the corpus
of SQuAD paragraphs plus the default distractor passages), encodes the corpus with the shipped
encoder (cached), builds one version with S = 2 shards and one with S = 1 (both with BM25), and
measures on a local Ray:

- the fusion sweep: recall@5 of hybrid for each setting of SWEEP on a seeded sample of the training
  articles' questions (never the test questions), from which the default of cluster/fusion.py is chosen;
- recall@1/5/10 of dense, BM25 and hybrid (the default fusion; RRF over each top-5, the previous
  default, too) on the test questions, S = 2 (skipped with --sweep-only, so the test set is touched
  only once a default is chosen);
- BM25 build throughput (tokenising + corpus statistics + weights, one shard, in this process);
- BM25 queries per second at batch 1, S = 2 against S = 1 (the same actors and fan-out code),
  and that both return the same ids and scores;
- the latency hybrid adds over dense at batch 1 (question encoding included in both).

The last line is one JSON object.

    python bench/retrievers.py --sweep-only   # choose the fusion default: training-article questions
    python bench/retrievers.py                # then the test questions, once
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cluster.bm25 import Bm25Params, build_shards
from cluster.encoders import TextEncoder, load_encoders
from cluster.fusion import RetrievalConfig
from cluster.index_build import build_index_from_vectors
from cluster.merge import SearchResult
from cluster.passages import Passage, load_corpus, passage_text
from cluster.runtime import init_ray
from cluster.shard_group import ShardGroup, ShardGroupConfig
from services.rag.local import document_vectors
from services.rag.model import default_doc_score_scale
from services.rag.retrieval import Retrieved, Search, group_search, retrieve
from training.data import QAExample, load_qa
from training.evaluate import retrieval_recall
from training.experiment import ExperimentConfig, load_experiment
from training.experiment_data import sample_questions, write_data

RETRIEVERS = ("dense", "bm25", "hybrid")
# the fusion settings swept, in order of preference on a tie (the standard RRF first, then the even mix,
# then the fewer candidates)
SWEEP = tuple(
    RetrievalConfig(retriever="hybrid", candidates=n, **fusion)
    for fusion in (
        {"fusion": "rrf", "rrf_k": 60.0},
        *({"fusion": "linear", "alpha": a} for a in (0.5, 0.3, 0.7)),
    )
    for n in (5, 10, 20, 50)
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu", help="the experiment preset whose data is used")
    parser.add_argument("--latency-questions", type=int, default=100, help="batch-1 queries timed per side")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument(
        "--sweep-questions", type=int, default=300, help="training-article questions the fusion sweep uses"
    )
    parser.add_argument(
        "--sweep-only", action="store_true", help="run the fusion sweep alone, without the test questions"
    )
    parser.add_argument(
        "--bm25-stopwords",
        default=Bm25Params().stopwords,
        help="the bm25s stop-word list BM25 drops (en: 33 words, en_plus: 179; 'none': keep every word)",
    )
    return parser.parse_args()


def corpus_vectors(passages: list[Passage], distractors: list[Passage], encoder: TextEncoder) -> np.ndarray:
    """(N, d) document vectors, cached on disk per part: the distractor passages lead the corpus
    unchanged, so their cached vectors (`rayrag ask --local` over the default corpus) are reused."""
    if passages[: len(distractors)] != distractors:
        return document_vectors(passages, encoder)
    rest = document_vectors(passages[len(distractors) :], encoder)  # first: the lock may hold the other
    return np.concatenate([document_vectors(passages[: len(distractors)], encoder), rest])


def sweep_name(config: RetrievalConfig) -> str:
    """A sweep setting's key, e.g. "rrf60_n20" or "linear0.5_n20"."""
    mix = f"rrf{config.rrf_k:g}" if config.fusion == "rrf" else f"linear{config.alpha:g}"
    return f"{mix}_n{config.candidates}"


def head_search(found: dict[str, SearchResult]) -> Search:
    """A Search answering from `found` (each part's top-n of the same questions) cut to the k asked
    for: the top-k of a top-n merged with ties by id is what a search to depth k returns."""

    def cut(result: SearchResult, k: int) -> SearchResult:
        if k > result.ids.shape[1]:
            raise ValueError(f"k = {k} is deeper than the {result.ids.shape[1]} hits searched")
        return replace(
            result,
            scores=result.scores[:, :k],
            ids=result.ids[:, :k],
            titles=[row[:k] for row in result.titles],
            texts=[row[:k] for row in result.texts],
            vectors=None if result.vectors is None else result.vectors[:, :k],
        )

    return lambda queries, questions, k, parts: {name: cut(found[name], k) for name in parts}


def fusion_sweep(
    encoder: TextEncoder, group: ShardGroup, examples: list[QAExample], scale: float
) -> dict[str, float]:
    """recall@5 of dense, BM25 and each SWEEP setting on `examples` (k = 5: each part's top-N is
    searched to depth N), from one search of each part's top-50."""
    questions = [e.input for e in examples]
    depth = max(config.candidates for config in SWEEP)
    found = group_search(group)(encoder.encode(questions), questions, depth, ("dense", "bm25"))
    search = head_search(found)
    configs = {name: RetrievalConfig(retriever=name) for name in ("dense", "bm25")}
    configs.update({sweep_name(config): config for config in SWEEP})
    return {
        name: retrieval_recall(
            retrieve(encoder, search, questions, 5, scale, retrieval=config), examples, (5,)
        )[5]
        for name, config in configs.items()
    }


def timed_bm25(group: ShardGroup, encoder_dim: int, questions: list[str], k: int) -> tuple[float, list]:
    """Batch-1 BM25 queries per second through the group, and each answer."""
    zero = np.zeros((1, encoder_dim), np.float32)  # the group checks a query row; BM25 ignores it
    group.search_retrievers(zero, questions[:1], k, ("bm25",))  # warm: pages mapped, actors hot
    answers, start = [], time.perf_counter()
    for question in questions:
        answers.append(group.search_retrievers(zero, [question], k, ("bm25",))["bm25"])
    return len(questions) / (time.perf_counter() - start), answers


def p50_ms(encoder: TextEncoder, group: ShardGroup, questions: list[str], scale: float) -> dict[str, float]:
    """Batch-1 p50 of dense and of hybrid, the two alternating question by question (the same load)."""
    search, times = group_search(group), {"dense": [], "hybrid": []}
    for question in questions:
        for name in times:
            start = time.perf_counter()
            retrieve(encoder, search, [question], 5, scale, retrieval=RetrievalConfig(retriever=name))
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values[1:]) for name, values in times.items()}  # the first warms


def build(
    out: Path, cfg: ExperimentConfig, doc_encoder: TextEncoder, params: Bm25Params
) -> tuple[dict, np.ndarray, dict[int, str], float]:
    """The preset's data under `out`, its vectors, versions with S = 1 and S = 2, and the BM25 build time."""
    counts = write_data(cfg.data, out / "data")
    passages = load_corpus(str(out / "data" / "corpus.jsonl"))
    vectors = corpus_vectors(
        passages, load_corpus(cfg.data.distractors, cfg.data.distractor_limit), doc_encoder
    )
    texts = [passage_text(p) for p in passages]
    start = time.perf_counter()
    chunks = [lambda: (texts[i : i + 4096] for i in range(0, len(texts), 4096))]  # one shard
    (out / "bm25-alone").mkdir(exist_ok=True)
    build_shards(out / "bm25-alone", chunks, params)
    build_s = time.perf_counter() - start
    versions = {
        s: build_index_from_vectors(vectors, passages, out / f"index-s{s}", shards=s, bm25_params=params)
        for s in (1, 2)
    }
    return counts, vectors, versions, build_s


def test_figures(
    encoder: TextEncoder, groups: dict[int, ShardGroup], examples: list[QAExample], scale: float, timed: int
) -> dict:
    """The test questions' recall@1/5/10 (S = 2), BM25 batch-1 QPS (S = 2 and S = 1) and p50 latencies."""
    questions = [e.input for e in examples]
    search = group_search(groups[2])
    configs = {name: RetrievalConfig(retriever=name) for name in RETRIEVERS}
    # the previous default beside it
    configs["hybrid_rrf"] = RetrievalConfig(retriever="hybrid", fusion="rrf", candidates=5)
    found = {
        name: Retrieved.concat(
            [
                retrieve(encoder, search, questions[i : i + 32], 10, scale, retrieval=config)
                for i in range(0, len(questions), 32)
            ]
        )
        for name, config in configs.items()
    }
    qps = {s: timed_bm25(groups[s], encoder.dim, questions[:timed], 10) for s in (1, 2)}
    same = all(
        np.array_equal(a.ids, b.ids) and np.array_equal(a.scores, b.scores)
        for a, b in zip(qps[1][1], qps[2][1])
    )
    latency = p50_ms(encoder, groups[2], questions[:timed], scale)
    return {
        **{
            f"recall_at_{k}_{name}": round(value, 4)
            for name in configs
            for k, value in retrieval_recall(found[name], examples, (1, 5, 10)).items()
        },
        "bm25_qps_b1_sharded_s2": round(qps[2][0], 1),
        "bm25_qps_b1_single": round(qps[1][0], 1),
        "bm25_qps_b1_sharded_over_single": round(qps[2][0] / qps[1][0], 3),
        "bm25_sharded_equals_single": bool(same),
        "dense_p50_ms": round(latency["dense"], 2),
        "hybrid_p50_ms": round(latency["hybrid"], 2),
        "hybrid_p50_ms_over_dense": round(latency["hybrid"] - latency["dense"], 2),
        "latency_questions": len(questions[:timed]),
    }


def sweep_summary(recall: dict[str, float], questions: int) -> dict:
    """The sweep's keys: each setting's recall@5 and the best (the first in SWEEP's order on a tie)."""
    best = max((sweep_name(config) for config in SWEEP), key=lambda name: recall[name])  # first max wins
    return {
        "sweep_questions": questions,
        **{f"sweep_recall_at_5_{name}": round(value, 4) for name, value in recall.items()},
        "sweep_best": best,
        "hybrid_default": sweep_name(RetrievalConfig(retriever="hybrid")),
    }


def main() -> None:
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="rayrag-bench-retrievers-"))
    cfg = load_experiment(args.preset, None)
    query_encoder, doc_encoder = load_encoders(cfg.models.query_encoder, cfg.models.doc_encoder)
    stopwords = None if args.bm25_stopwords == "none" else args.bm25_stopwords
    params = Bm25Params(stopwords=stopwords)
    counts, vectors, versions, build_s = build(out, cfg, doc_encoder, params)
    sweep = sample_questions(load_qa(str(out / "data" / "train.jsonl")), args.sweep_questions, cfg.data.seed)
    test = load_qa(str(out / "data" / "test.jsonl"))
    scale = default_doc_score_scale(query_encoder)
    init_ray(log_to_driver=False)
    groups = {
        s: ShardGroup(
            ShardGroupConfig(index_root=str(out / f"index-s{s}"), shard_cpus=0), version=versions[s]
        )
        for s in (1, 2)
    }
    try:
        summary = {
            "passages": counts["passages"],
            "bm25_stopwords": stopwords,
            "bm25_build_passages_per_s": round(len(vectors) / build_s, 1),
        }
        summary.update(sweep_summary(fusion_sweep(query_encoder, groups[2], sweep, scale), len(sweep)))
        if not args.sweep_only:
            summary["test_questions"] = len(test)
            summary.update(test_figures(query_encoder, groups, test, scale, args.latency_questions))
    finally:
        for group in groups.values():
            group.close()
    for key, value in summary.items():
        print(f"{key}: {value}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
