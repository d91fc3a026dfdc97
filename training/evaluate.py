"""Evaluation of a task (QA: EM / F1 / recall@k; qgen: BLEU-1 / ROUGE-L; classify: accuracy) for
closed-book, RAG-Token and RAG-Sequence; JSON report and plots."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import ConfigDict, Field, PositiveInt

from cluster.config import Config
from cluster.fusion import RetrievalConfig
from cluster.passages import Passage, passage_text
from services.rag import retrieval
from services.rag.config import DecodingConfig
from services.rag.marginal import doc_log_probs
from services.rag.model import RagModel
from services.rag.retrieval import DENSE, Retrieved, group_search
from training.data import QAExample
from training.scoring import answer_in_passages
from training.tasks import Task, TaskName, choose_labels, get_task, task_labels

Setting = Literal["closed_book", "rag_token", "rag_sequence"]
SETTINGS: tuple[Setting, ...] = get_args(Setting)
RECALL_K = 5  # the recall@k of each setting's row

logger = logging.getLogger(__name__)


class EvalConfig(Config):
    """What `rayrag eval` measures: the task, the settings, the n_docs of each row, and how they decode."""

    model_config = ConfigDict(frozen=True)
    n_docs: tuple[PositiveInt, ...] = Field(
        (1, 2, 5), min_length=1, description="docs to the generator; a row each"
    )
    settings: tuple[Setting, ...] = Field(SETTINGS, min_length=1)
    batch_size: int = Field(8, ge=1, description="questions per retrieval and per decoding")
    # how each row decodes (its n_docs and mode set per row); answers here are short: 16 tokens at most
    decode: DecodingConfig = Field(default_factory=lambda: DecodingConfig(max_new_tokens=16))
    recall_at: tuple[PositiveInt, ...] = (1, 5, 10)  # retriever recall@k reported (with n_docs)
    task: TaskName = Field(
        "qa",
        description="qa: EM/F1; qgen: answer -> question, BLEU-1/ROUGE-L; classify: claim -> label, accuracy",
    )
    labels: tuple[str, ...] = ()  # classify: the candidate label words (empty: those of the data)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)  # dense, bm25 or hybrid


def retrieve(
    rag: RagModel,
    shard_group: Any,
    questions: Sequence[str],
    k: int,
    batch_size: int,
    config: RetrievalConfig = DENSE,
) -> Retrieved:
    """Top-k passages and doc scores per question, `batch_size` questions per search, all from one index
    version; `shard_group` is a ShardGroup (or anything with its search_retrievers)."""
    search = group_search(shard_group)
    return Retrieved.concat(
        [
            retrieval.retrieve(
                rag.query_encoder,
                search,
                questions[start : start + batch_size],
                k,
                rag.doc_score_scale,
                retrieval=config,
            )
            for start in range(0, len(questions), batch_size)
        ]
    )


@torch.no_grad()
def predict(
    rag: RagModel,
    questions: Sequence[str],
    retrieved: Retrieved | None,
    setting: str,
    n_docs: int,
    cfg: EvalConfig,
) -> list[str]:
    """Predictions for one setting (answers, questions or label words, as the task says); closed-book
    gives the generator one empty passage."""
    generates, began = get_task(cfg.task).generates, time.monotonic()
    out: list[str] = []
    for number, start in enumerate(range(0, len(questions), cfg.batch_size)):
        if number and number % 10 == 0:
            logger.info(
                f"[eval] {setting} n_docs={n_docs}: {start}/{len(questions)} "
                f"({time.monotonic() - began:.0f}s)"
            )
        chunk = list(questions[start : start + cfg.batch_size])
        if setting == "closed_book" or retrieved is None:
            titles, texts = [[""] for _ in chunk], [[""] for _ in chunk]
            scores = torch.zeros(len(chunk), 1)  # (b, 1)
        else:
            rows = slice(start, start + len(chunk))
            titles = [t[:n_docs] for t in retrieved.titles[rows]]
            texts = [t[:n_docs] for t in retrieved.texts[rows]]
            scores = retrieved.doc_scores[rows, :n_docs]  # (b, n_docs)
        mode = "token" if setting == "rag_token" else "sequence"
        if not generates:
            out += choose_labels(rag.generator, chunk, titles, texts, scores, cfg.labels, mode)
            continue
        options = cfg.decode.model_copy(update={"n_docs": n_docs, "mode": mode})
        out += rag.generate(chunk, titles, texts, scores, options)
    return out


def with_labels(cfg: EvalConfig, examples: Sequence[QAExample]) -> EvalConfig:
    """For label generation, `cfg` with its label words (those of the data when it names none), each
    example's label among them."""
    if get_task(cfg.task).generates:
        return cfg
    labels = cfg.labels or task_labels(examples)
    unknown = sorted({e.answers[0] for e in examples} - set(labels))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the label words {list(labels)}")
    return cfg.model_copy(update={"labels": tuple(labels)})


def _rows(
    rag: RagModel,
    task: Task,
    examples: Sequence[QAExample],
    retrieved: Retrieved,
    setting: str,
    cfg: EvalConfig,
    keep_predictions: bool,
) -> dict[str, dict]:
    """The task's metrics for each n_docs of a setting, with the first few predictions (every one when
    `keep_predictions`)."""
    questions = [e.input for e in examples]
    targets = [list(e.answers) for e in examples]
    source, gold = task.fields
    rows = {}
    for n_docs in (1,) if setting == "closed_book" else cfg.n_docs:
        predictions = predict(rag, questions, retrieved, setting, n_docs, cfg)
        rows[str(n_docs)] = task.score(predictions, targets) | {
            "examples": [
                {source: q, "prediction": p, gold: a}
                for q, p, a in list(zip(questions, predictions, targets))[:5]
            ]
        }
        if keep_predictions:
            rows[str(n_docs)]["predictions"] = predictions
    return rows


def retrieved_rows(retrieved: Retrieved, k: int) -> list[list[dict]]:
    """Per question its first k passages: title, text and p(z|x) (the softmax of their doc scores)."""
    p = doc_log_probs(torch.as_tensor(retrieved.doc_scores[:, :k], dtype=torch.float32)).exp()  # (B, k)
    return [
        [{"title": t, "text": x, "p": round(float(pz), 6)} for t, x, pz in zip(ts[:k], xs[:k], row)]
        for ts, xs, row in zip(retrieved.titles, retrieved.texts, p.tolist())
    ]


def evaluate(
    rag: RagModel,
    shard_group: Any,
    examples: Sequence[QAExample],
    cfg: EvalConfig,
    index_size: int,
    keep_predictions: bool = False,
) -> dict:
    """The report: per setting the task's metrics (and recall@k for QA), per n_docs rows for the RAG
    settings. `keep_predictions` adds every prediction to each row and, under "passages", each
    question's retrieved passages (up to the widest n_docs) with p(z|x)."""
    task, cfg = get_task(cfg.task), with_labels(cfg, examples)
    questions = [e.input for e in examples]
    widest = max(*cfg.n_docs, *cfg.recall_at, RECALL_K)
    if max(cfg.n_docs) > index_size:
        raise ValueError(f"n_docs={max(cfg.n_docs)} is larger than the index ({index_size} passages)")
    retrieved = retrieve(rag, shard_group, questions, min(widest, index_size), cfg.batch_size, cfg.retrieval)
    report: dict = {
        "questions": len(examples),
        "index_versions": [retrieved.version],
        "retriever": cfg.retrieval.retriever,
    }
    recall = retrieval_recall(retrieved, examples, (*cfg.n_docs, *cfg.recall_at)) if task.recall else {}
    if task.recall:
        report["recall"] = {str(k): v for k, v in recall.items()}
    report |= {"config": cfg.model_dump(), "settings": {}}
    if keep_predictions:
        report["passages"] = retrieved_rows(retrieved, max(cfg.n_docs))
        if task.recall:
            hits = recall_hits(retrieved, examples, (*cfg.n_docs, *cfg.recall_at))
            report["recall_hits"] = {str(k): v for k, v in hits.items()}
    for setting in cfg.settings:
        rows = _rows(rag, task, examples, retrieved, setting, cfg, keep_predictions)
        row = {
            k: v
            for k, v in rows[str(max(int(k) for k in rows))].items()
            if k not in ("examples", "predictions")
        }
        if task.recall:
            row["recall_at_5"] = None if setting == "closed_book" else recall[RECALL_K]
        report["settings"][setting] = row | {"by_n_docs": rows}
    return report


def recall_hits(
    retrieved: Retrieved, examples: Sequence[QAExample], ks: Sequence[int]
) -> dict[int, list[int]]:
    """Per k of `ks` and RECALL_K, per question: 1 when a gold answer is in its first k passages."""
    passages = [
        [passage_text(Passage(0, t, x)) for t, x in zip(ts, xs)]
        for ts, xs in zip(retrieved.titles, retrieved.texts)
    ]
    return {
        k: [int(answer_in_passages(p[:k], list(e.answers))) for p, e in zip(passages, examples)]
        for k in sorted(set(ks) | {RECALL_K})
    }


def retrieval_recall(
    retrieved: Retrieved, examples: Sequence[QAExample], ks: Sequence[int]
) -> dict[int, float]:
    """recall@k for every k of `ks` and RECALL_K: a gold answer found in the first k passages."""
    return {k: sum(hits) / max(len(hits), 1) for k, hits in recall_hits(retrieved, examples, ks).items()}


def summary_line(report: dict) -> dict:
    """The one-line result: the task's metrics (QA: em, f1, recall_at_5) for each evaluated setting."""
    keys = get_task(report["config"]["task"]).summary
    return {name: {k: row[k] for k in keys} for name, row in report["settings"].items()}


def read_history(path: str | Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            steps.append(row["step"])
            losses.append(row["loss"])
    return steps, losses


def write_plots(report: dict, out_dir: str | Path, history: str | Path | None = None) -> list[str]:
    """PNG plots with matplotlib's Agg backend: the task's first metric (QA: EM) against n_docs, and the
    loss curve when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = get_task(report["config"]["task"])
    metric, (axis, short) = task.summary[0], task.axis
    out_dir, written = Path(out_dir), []
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for name, row in report["settings"].items():
        ks = sorted(int(k) for k in row["by_n_docs"])
        values = [row["by_n_docs"][str(k)][metric] for k in ks]
        if name == "closed_book":
            axes.axhline(values[0], linestyle="--", color="gray", label="closed-book")
        else:
            axes.plot(ks, values, marker="o", label=name.replace("_", "-"))
    axes.set(xlabel="n_docs", ylabel=axis, title=f"{short} vs retrieved documents")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_dir / f"{metric}_vs_n_docs.png", dpi=100)
    written.append(str(out_dir / f"{metric}_vs_n_docs.png"))
    plt.close(figure)
    if history is not None:
        steps, losses = read_history(history)
        figure, axes = plt.subplots(figsize=(5, 3.5))
        axes.plot(steps, losses)
        axes.set(xlabel="step", ylabel="RAG NLL", title="training loss")
        figure.tight_layout()
        figure.savefig(out_dir / "loss.png", dpi=100)
        written.append(str(out_dir / "loss.png"))
        plt.close(figure)
    return written
