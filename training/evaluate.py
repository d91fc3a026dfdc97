"""Evaluation: EM / F1 / recall@k for closed-book, RAG-Token and RAG-Sequence; JSON report and plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import ConfigDict, Field, PositiveInt

from cluster.config import Config
from cluster.passages import Passage, passage_text
from services.rag import retrieval
from services.rag.model import Decoding, RagModel
from services.rag.retrieval import Retrieved
from training.data import QAExample
from training.metrics import recall_at_k, score_predictions

Setting = Literal["closed_book", "rag_token", "rag_sequence"]
SETTINGS: tuple[Setting, ...] = get_args(Setting)
RECALL_K = 5


class EvalConfig(Config):
    """What `rayrag eval` measures: the settings, the n_docs of each row, and how to decode."""

    model_config = ConfigDict(frozen=True)
    n_docs: tuple[PositiveInt, ...] = Field((1, 2, 5), min_length=1)  # docs to the generator; a row each
    settings: tuple[Setting, ...] = Field(SETTINGS, min_length=1)
    batch_size: int = Field(8, ge=1)
    num_beams: int = Field(4, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    decoding: Decoding = "fast"  # RAG-Sequence decoding


def retrieve(rag: RagModel, shard_group: Any, questions: Sequence[str], k: int, batch_size: int) -> Retrieved:
    """Top-k passages and doc scores per question, `batch_size` questions per search, all from one index
    version; `shard_group` is a ShardGroup (or anything with its search)."""
    search = partial(shard_group.search, return_vectors=True)
    return Retrieved.concat(
        [
            retrieval.retrieve(
                rag.query_encoder, search, questions[start : start + batch_size], k, rag.doc_score_scale
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
    """Answers for one setting; closed-book gives the generator one empty passage."""
    out: list[str] = []
    for start in range(0, len(questions), cfg.batch_size):
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
        out += rag.generate(
            chunk,
            titles,
            texts,
            scores,
            mode=mode,
            decoding=cfg.decoding,
            num_beams=cfg.num_beams,
            max_new_tokens=cfg.max_new_tokens,
        )
    return out


def evaluate(
    rag: RagModel, shard_group: Any, examples: Sequence[QAExample], cfg: EvalConfig, index_size: int
) -> dict:
    """The report: per setting EM/F1 (and recall@k), per n_docs rows for the RAG settings."""
    questions = [e.question for e in examples]
    answers = [list(e.answers) for e in examples]
    widest = max(max(cfg.n_docs), RECALL_K)
    if max(cfg.n_docs) > index_size:
        raise ValueError(f"n_docs={max(cfg.n_docs)} is larger than the index ({index_size} passages)")
    retrieved = retrieve(rag, shard_group, questions, min(widest, index_size), cfg.batch_size)
    passages = [
        [passage_text(Passage(0, t, x)) for t, x in zip(ts, xs)]
        for ts, xs in zip(retrieved.titles, retrieved.texts)
    ]
    recall = {k: recall_at_k(passages, answers, k) for k in sorted(set(cfg.n_docs) | {RECALL_K})}
    report: dict = {
        "questions": len(examples),
        "index_versions": [retrieved.version],
        "recall": {str(k): v for k, v in recall.items()},
        "config": cfg.model_dump(),
        "settings": {},
    }
    for setting in cfg.settings:
        rows = {}
        for n_docs in (1,) if setting == "closed_book" else cfg.n_docs:
            predictions = predict(rag, questions, retrieved, setting, n_docs, cfg)
            rows[str(n_docs)] = score_predictions(predictions, answers) | {
                "examples": [
                    {"question": q, "prediction": p, "answers": a}
                    for q, p, a in list(zip(questions, predictions, answers))[:5]
                ]
            }
        best = rows[str(max(int(k) for k in rows))]
        report["settings"][setting] = {
            "em": best["em"],
            "f1": best["f1"],
            "recall_at_5": None if setting == "closed_book" else recall[RECALL_K],
            "by_n_docs": rows,
        }
    return report


def summary_line(report: dict) -> dict:
    """The one-line result: em, f1, recall_at_5 for each evaluated setting."""
    return {
        name: {k: row[k] for k in ("em", "f1", "recall_at_5")} for name, row in report["settings"].items()
    }


def read_history(path: str | Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            steps.append(row["step"])
            losses.append(row["loss"])
    return steps, losses


def write_plots(report: dict, out_dir: str | Path, history: str | Path | None = None) -> list[str]:
    """PNG plots with matplotlib's Agg backend: EM against n_docs, and the loss curve when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir, written = Path(out_dir), []
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for name, row in report["settings"].items():
        ks = sorted(int(k) for k in row["by_n_docs"])
        ems = [row["by_n_docs"][str(k)]["em"] for k in ks]
        if name == "closed_book":
            axes.axhline(ems[0], linestyle="--", color="gray", label="closed-book")
        else:
            axes.plot(ks, ems, marker="o", label=name.replace("_", "-"))
    axes.set(xlabel="n_docs", ylabel="exact match", title="EM vs retrieved documents")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "em_vs_n_docs.png", dpi=100)
    written.append(str(out_dir / "em_vs_n_docs.png"))
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
