"""The paper's task families on one model: each fixes its data (input → target) and its metrics.

- `qa`: open-domain QA; question → answer; exact match and F1.
- `qgen`: Jeopardy-style question generation; answer → the question it answers; BLEU-1 and ROUGE-L.
- `classify`: label generation (FEVER-style); claim → label word; accuracy. Evaluation does not decode:
  each label word is scored under the RAG marginal and the likeliest is the prediction.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.rag.config import Mode
from services.rag.generator import Generator
from services.rag.marginal import candidate_log_likelihoods
from training.config import TASKS, TaskName
from training.data import QAExample, Split, load_claims, load_qa, squad_qa_by_article
from training.metrics import normalize_answer, score_generations, score_labels, score_predictions

CLAIM_LABELS = ("true", "false")  # the label words of `make_claims`


def load_qgen(path: str) -> list[QAExample]:
    """QA data turned around: each question's first answer is the input, the question the target."""
    return [QAExample(question=e.answers[0], answers=(e.question,)) for e in load_qa(path)]


@dataclass(frozen=True)
class Task:
    """What a task reads and how it is scored."""

    name: TaskName
    load: Callable[[str], list[QAExample]]  # data spec -> examples (input in .question, targets in .answers)
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


def _kind(answer: str) -> str:
    """A rough answer type, for swapping like with like: a number, a name, or other."""
    if any(ch.isdigit() for ch in answer):
        return "number"
    return "name" if answer[:1].isupper() else "other"


def _swaps(example: QAExample, article: Sequence[QAExample]) -> list[str]:
    """Answers of other questions of the article, of the same kind, that neither contain nor are
    contained in any of this question's gold answers (after SQuAD normalisation)."""
    gold = [normalize_answer(a) for a in example.answers]
    out = {}
    for other in article:
        answer = other.answers[0]
        norm = normalize_answer(answer)
        if (
            norm
            and _kind(answer) == _kind(example.answers[0])
            and not any(norm in g or g in norm for g in gold)
        ):
            out.setdefault(norm, answer)
    return sorted(out.values())


def claim_text(question: str, answer: str) -> str:
    return f'The answer to "{question.strip()}" is {answer}.'


def make_claims(path: Path, split: Split | None, count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` labelled claims from SQuAD-format data, half "true" and half "false", drawn with `seed`.

    Questions are shuffled; claim i takes label CLAIM_LABELS[i % 2]. A true claim states a question's
    first answer (`claim_text`); a false one a different answer drawn from the other questions of the
    same article with the same rough type (number, capitalised name, other), never one that contains or
    is contained in a gold answer; a question with no such answer is passed over for a false claim.
    """
    rng = random.Random(seed)
    pool = [(e, article) for _, article in squad_qa_by_article(path, split) for e in article]
    rng.shuffle(pool)
    claims: list[dict[str, str]] = []
    for example, article in pool:
        label = CLAIM_LABELS[len(claims) % 2]
        swaps = _swaps(example, article) if label == "false" else []
        if label == "false" and not swaps:
            continue
        answer = rng.choice(swaps) if swaps else example.answers[0]
        claims.append({"claim": claim_text(example.question, answer), "label": label})
        if len(claims) == count:
            return claims
    raise ValueError(f"{str(path)!r} (split {split}) has too few questions for {count} claims")
