"""Retriever benchmark: dense, BM25 and hybrid on the experiment's SQuAD test questions over its corpus.

Builds the cpu preset's data (examples/experiment_cpu.yaml: held-out articles' questions; the corpus
of SQuAD paragraphs plus the default distractor passages), encodes the corpus with the shipped
encoder (cached), builds one version with S = 2 shards and one with S = 1 (both with BM25), and
measures on a local Ray:

- recall@1/5/10 of dense, BM25 and hybrid (the default linear fusion; RRF too) on the same questions, S = 2;
- BM25 build throughput (tokenising + corpus statistics + weights, one shard, in this process);
- BM25 queries per second at batch 1, S = 2 against S = 1 (the same actors and fan-out code),
  and that both return the same ids and scores;
- the latency hybrid adds over dense at batch 1 (question encoding included in both).

The last line is one JSON object.

    python bench/retrievers.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from cluster.bm25 import Bm25Params, build_shards
from cluster.encoders import TextEncoder, load_encoders
from cluster.fusion import RetrievalConfig
from cluster.index_build import build_index_from_vectors
from cluster.passages import Passage, load_corpus, passage_text
from cluster.runtime import init_ray
from cluster.shard_group import ShardGroup, ShardGroupConfig
from services.rag.local import document_vectors
from services.rag.model import default_doc_score_scale
from services.rag.retrieval import Retrieved, group_search, retrieve
from training.data import load_qa
from training.evaluate import retrieval_recall
from training.experiment import load_experiment, write_data

RETRIEVERS = ("dense", "bm25", "hybrid")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu", help="the experiment preset whose data is used")
    parser.add_argument("--latency-questions", type=int, default=100, help="batch-1 queries timed per side")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    return parser.parse_args()


def corpus_vectors(passages: list[Passage], distractors: list[Passage], encoder: TextEncoder) -> np.ndarray:
    """(N, d) document vectors, cached on disk per part: the distractor passages lead the corpus
    unchanged, so their cached vectors (`rayrag ask --local` over the default corpus) are reused."""
    if passages[: len(distractors)] != distractors:
        return document_vectors(passages, encoder)
    rest = document_vectors(passages[len(distractors) :], encoder)  # first: the lock may hold the other
    return np.concatenate([document_vectors(passages[: len(distractors)], encoder), rest])


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


def main() -> None:
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="rayrag-bench-retrievers-"))
    cfg = load_experiment(args.preset, None)
    counts = write_data(cfg.data, out / "data")
    passages = load_corpus(str(out / "data" / "corpus.jsonl"))
    examples = load_qa(str(out / "data" / "test.jsonl"))
    questions = [e.question for e in examples]
    query_encoder, doc_encoder = load_encoders(cfg.models.query_encoder, cfg.models.doc_encoder)
    vectors = corpus_vectors(
        passages, load_corpus(cfg.data.distractors, cfg.data.distractor_limit), doc_encoder
    )
    texts = [passage_text(p) for p in passages]
    start = time.perf_counter()
    chunks = [lambda: (texts[i : i + 4096] for i in range(0, len(texts), 4096))]  # one shard
    (out / "bm25-alone").mkdir(exist_ok=True)
    build_shards(out / "bm25-alone", chunks, Bm25Params())
    build_s = time.perf_counter() - start
    versions = {s: build_index_from_vectors(vectors, passages, out / f"index-s{s}", shards=s) for s in (1, 2)}
    init_ray(log_to_driver=False)
    groups = {
        s: ShardGroup(
            ShardGroupConfig(index_root=str(out / f"index-s{s}"), shard_cpus=0), version=versions[s]
        )
        for s in (1, 2)
    }
    try:
        scale = default_doc_score_scale(query_encoder)
        search = group_search(groups[2])
        found = {
            name: Retrieved.concat(
                [
                    retrieve(query_encoder, search, questions[i : i + 32], 10, scale, retrieval=config)
                    for i in range(0, len(questions), 32)
                ]
            )
            for name in RETRIEVERS
            for config in [RetrievalConfig(retriever=name)]
        }
        rrf = RetrievalConfig(retriever="hybrid", fusion="rrf", candidates=50)
        found["hybrid_rrf"] = Retrieved.concat(
            [
                retrieve(query_encoder, search, questions[i : i + 32], 10, scale, retrieval=rrf)
                for i in range(0, len(questions), 32)
            ]
        )
        timed = questions[: args.latency_questions]
        qps = {s: timed_bm25(groups[s], vectors.shape[1], timed, 10) for s in (1, 2)}
        same = all(
            np.array_equal(a.ids, b.ids) and np.array_equal(a.scores, b.scores)
            for a, b in zip(qps[1][1], qps[2][1])
        )
        latency = p50_ms(query_encoder, groups[2], timed, scale)
    finally:
        for group in groups.values():
            group.close()
    summary = {
        "test_questions": len(questions),
        "passages": counts["passages"],
        **{
            f"recall_at_{k}_{name}": round(value, 4)
            for name in (*RETRIEVERS, "hybrid_rrf")
            for k, value in retrieval_recall(found[name], examples, (1, 5, 10)).items()
        },
        "bm25_build_passages_per_s": round(len(passages) / build_s, 1),
        "bm25_qps_b1_sharded_s2": round(qps[2][0], 1),
        "bm25_qps_b1_single": round(qps[1][0], 1),
        "bm25_qps_b1_sharded_over_single": round(qps[2][0] / qps[1][0], 3),
        "bm25_sharded_equals_single": bool(same),
        "dense_p50_ms": round(latency["dense"], 2),
        "hybrid_p50_ms": round(latency["hybrid"], 2),
        "hybrid_p50_ms_over_dense": round(latency["hybrid"] - latency["dense"], 2),
        "latency_questions": len(timed),
    }
    for key, value in summary.items():
        print(f"{key}: {value}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
