"""The paper's task families on one model: each fixes its data (input → target) and its metrics.

- `qa`: open-domain QA; question → answer; exact match and F1.
- `qgen`: Jeopardy-style question generation; answer → the question it answers; BLEU-1 and ROUGE-L.
- `classify`: label generation (FEVER-style); claim → label word; accuracy. Evaluation does not decode:
  each label word is scored under the RAG marginal and the likeliest is the prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.rag.config import Mode
from services.rag.generator import Generator
from services.rag.marginal import candidate_log_likelihoods
from training.config import TASKS, TaskName
from training.data import QAExample, load_claims, load_qa
from training.scoring import score_generations, score_labels, score_predictions


def load_qgen(path: str) -> list[QAExample]:
    """QA data turned around: each question's first answer is the input, the question the target."""
    return [QAExample(input=e.answers[0], answers=(e.input,)) for e in load_qa(path)]


@dataclass(frozen=True)
class Task:
    """What a task reads and how it is scored."""

    name: TaskName
    load: Callable[[str], list[QAExample]]  # data spec -> examples (.input, targets in .answers)
    score: Callable[[Sequence[str], Sequence[Sequence[str]]], dict[str, float]]  # predictions, targets
    summary: tuple[str, ...]  # the keys of the one-line result; the first is plotted against n_docs
    axis: tuple[str, str]  # the plotted metric: axis label, short name
    fields: tuple[str, str]  # the names of the input and of its targets in report examples
    recall: bool = False  # retrieval recall@k: a target found in the passages (answers, for QA)
    generates: bool = True  # False: choose the likeliest of the data's label words


TASK_SPECS: dict[str, Task] = {
    "qa": Task(
        "qa",
        load_qa,
        score_predictions,
        ("em", "f1", "recall_at_5"),
        ("exact match", "EM"),
        ("question", "answers"),
        recall=True,
    ),
    "qgen": Task(
        "qgen",
        load_qgen,
        score_generations,
        ("bleu1", "rougeL"),
        ("BLEU-1", "BLEU-1"),
        ("answer", "questions"),
    ),
    "classify": Task(
        "classify",
        load_claims,
        score_labels,
        ("accuracy",),
        ("accuracy", "accuracy"),
        ("claim", "labels"),
        generates=False,
    ),
}


def get_task(name: str) -> Task:
    """The task called `name`; ValueError naming it otherwise."""
    if name not in TASK_SPECS:
        raise ValueError(f"unknown task {name!r}: expected one of {TASKS}")
    return TASK_SPECS[name]


def task_labels(examples: Sequence[QAExample]) -> tuple[str, ...]:
    """The label words of a classification data set, sorted; at least two."""
    labels = tuple(sorted({a for e in examples for a in e.answers}))
    if len(labels) < 2:
        raise ValueError(f"classification needs at least two label words, the data has {labels}")
    return labels


@torch.no_grad()
def label_log_likelihoods(
    generator: Generator,
    inputs: list[str],
    titles: list[list[str]],
    texts: list[list[str]],
    doc_scores: np.ndarray | torch.Tensor,
    labels: Sequence[str],
    mode: Mode,
) -> torch.Tensor:
    """log p(label|x) of every label word for each input (B, C), as the training loss scores a target:
    RAG-Sequence scores each label under every one of the K passages, RAG-Token marginalises per token."""
    if len(labels) < 2:
        raise ValueError(f"classification needs at least two label words, got {list(labels)}")
    ctx = generator.contexts(inputs, titles, texts)
    state, _ = generator.start(ctx, 1)
    target, mask = generator.answer_targets(list(labels))  # (C, T), (C, T)
    rows, c = ctx.input_ids.shape[0], len(labels)
    pairs = torch.arange(rows, device=target.device).repeat_interleave(c)  # (B*K*C,) context row of each pair
    token_lp = generator.score(state, pairs, target.repeat(rows, 1))  # (B*K*C, T)
    token_lp = token_lp.view(ctx.batch_size, ctx.n_docs, c, -1).transpose(1, 2)  # (B, C, K, T)
    scores = torch.as_tensor(doc_scores, dtype=torch.float32, device=token_lp.device)  # (B, K)
    return candidate_log_likelihoods(token_lp, scores, target, mask, token=mode == "token")  # (B, C)


def choose_labels(
    generator: Generator,
    inputs: list[str],
    titles: list[list[str]],
    texts: list[list[str]],
    doc_scores: np.ndarray | torch.Tensor,
    labels: Sequence[str],
    mode: Mode,
) -> list[str]:
    """The likeliest label word for each input (`label_log_likelihoods`)."""
    scores = label_log_likelihoods(generator, inputs, titles, texts, doc_scores, labels, mode)  # (B, C)
    return [labels[i] for i in scores.argmax(-1).tolist()]
