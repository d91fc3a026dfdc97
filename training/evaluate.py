"""Evaluation: EM / F1 / recall@k for closed-book, RAG-Token and RAG-Sequence; JSON report and plots."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cluster.passages import Passage, passage_text
from training.data import QAExample
from services.rag.model import RagModel
from training.metrics import recall_at_k, score_predictions

SETTINGS = ("closed_book", "rag_token", "rag_sequence")
RECALL_K = 5


@dataclass(frozen=True)
class EvalConfig:
    n_docs: tuple[int, ...] = (1, 2, 5)     # documents given to the generator; one row per value
    settings: tuple[str, ...] = SETTINGS
    batch_size: int = 8
    num_beams: int = 4
    max_new_tokens: int = 16
    decoding: str = "thorough"              # RAG-Sequence decoding: thorough | fast

    def __post_init__(self) -> None:
        if not self.n_docs or min(self.n_docs) < 1:
            raise ValueError(f"n_docs must be positive integers, got {self.n_docs}")
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or not self.settings:
            raise ValueError(f"unknown eval setting {unknown or self.settings}: expected some of {SETTINGS}")
        for key in ("batch_size", "num_beams", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.decoding not in ("thorough", "fast"):
            raise ValueError(f"decoding must be 'thorough' or 'fast', got {self.decoding!r}")


@dataclass
class Retrieved:
    titles: list[list[str]]
    texts: list[list[str]]
    doc_scores: torch.Tensor                 # (N, K) from the query encoder and the documents' vectors
    versions: set[str] = field(default_factory=set)


@torch.no_grad()
def retrieve(rag: RagModel, shard_group: Any, questions: Sequence[str], k: int, batch_size: int) -> Retrieved:
    """Top-k passages and doc scores per question; `shard_group` is a ShardGroup (or anything with its search)."""
    titles, texts, scores, versions = [], [], [], set()
    for start in range(0, len(questions), batch_size):
        chunk = list(questions[start:start + batch_size])
        query = rag.query_encoder.encode(chunk)  # (b, d)
        found = shard_group.search(query, k, return_vectors=True)
        scores.append(rag.doc_scores(torch.as_tensor(query), torch.as_tensor(found.vectors)))  # (b, k)
        titles += found.titles
        texts += found.texts
        versions.add(found.version)
    return Retrieved(titles, texts, torch.cat(scores), versions)


@torch.no_grad()
def predict(rag: RagModel, questions: Sequence[str], retrieved: Retrieved | None, setting: str,
            n_docs: int, cfg: EvalConfig) -> list[str]:
    """Answers for one setting; closed-book gives the generator one empty passage."""
    out: list[str] = []
    for start in range(0, len(questions), cfg.batch_size):
        chunk = list(questions[start:start + cfg.batch_size])
        if setting == "closed_book" or retrieved is None:
            titles, texts = [[""] for _ in chunk], [[""] for _ in chunk]
            scores = torch.zeros(len(chunk), 1)  # (b, 1)
        else:
            rows = slice(start, start + len(chunk))
            titles = [t[:n_docs] for t in retrieved.titles[rows]]
            texts = [t[:n_docs] for t in retrieved.texts[rows]]
            scores = retrieved.doc_scores[rows, :n_docs]  # (b, n_docs)
        mode = "token" if setting == "rag_token" else "sequence"
        out += rag.generate(chunk, titles, texts, scores, mode=mode, decoding=cfg.decoding,
                            num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens)
    return out


def evaluate(rag: RagModel, shard_group: Any, examples: Sequence[QAExample], cfg: EvalConfig,
             index_size: int) -> dict:
    """The report: per setting EM/F1 (and recall@k), per n_docs rows for the RAG settings."""
    questions = [e.question for e in examples]
    answers = [list(e.answers) for e in examples]
    widest = max(max(cfg.n_docs), RECALL_K)
    if max(cfg.n_docs) > index_size:
        raise ValueError(f"n_docs={max(cfg.n_docs)} is larger than the index ({index_size} passages)")
    retrieved = retrieve(rag, shard_group, questions, min(widest, index_size), cfg.batch_size)
    passages = [[passage_text(Passage(0, t, x)) for t, x in zip(ts, xs)]
                for ts, xs in zip(retrieved.titles, retrieved.texts)]
    recall = {k: recall_at_k(passages, answers, k) for k in sorted(set(cfg.n_docs) | {RECALL_K})}
    report: dict = {"questions": len(examples), "index_versions": sorted(retrieved.versions),
                    "recall": {str(k): v for k, v in recall.items()}, "config": asdict(cfg), "settings": {}}
    for setting in cfg.settings:
        rows = {}
        for n_docs in ((1,) if setting == "closed_book" else cfg.n_docs):
            predictions = predict(rag, questions, retrieved, setting, n_docs, cfg)
            rows[str(n_docs)] = score_predictions(predictions, answers) | {"examples": [
                {"question": q, "prediction": p, "answers": a}
                for q, p, a in list(zip(questions, predictions, answers))[:5]]}
        best = rows[str(max(int(k) for k in rows))]
        report["settings"][setting] = {"em": best["em"], "f1": best["f1"],
                                       "recall_at_5": None if setting == "closed_book" else recall[RECALL_K],
                                       "by_n_docs": rows}
    return report


def summary_line(report: dict) -> dict:
    """The one-line result: em, f1, recall_at_5 for each evaluated setting."""
    return {name: {k: row[k] for k in ("em", "f1", "recall_at_5")} for name, row in report["settings"].items()}


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

