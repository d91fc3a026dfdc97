"""Answer metrics: SQuAD answer normalisation, exact match, token F1, retrieval recall@k."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    guess = normalize_answer(prediction)
    return float(any(guess == normalize_answer(a) for a in answers))


def _f1(prediction: str, gold: str) -> float:
    guess, truth = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(guess) & collections.Counter(truth)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(guess), common / len(truth)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Best token-level F1 of the prediction against any gold answer."""
    return max(_f1(prediction, a) for a in answers)


def answer_in_passages(passages: Sequence[str], answers: Sequence[str]) -> bool:
    """True when a normalised gold answer occurs, as whole words, in a normalised passage."""
    texts = [f" {normalize_answer(p)} " for p in passages]
    golds = [f" {normalize_answer(a)} " for a in answers if normalize_answer(a)]
    return any(g in t for g in golds for t in texts)


def recall_at_k(retrieved: Sequence[Sequence[str]], answers: Sequence[Sequence[str]], k: int) -> float:
    """Fraction of questions with a gold answer string in one of their first k passages."""
    if len(retrieved) != len(answers):
        raise ValueError(f"recall_at_k: {len(retrieved)} retrieval lists for {len(answers)} questions")
    if not retrieved:
        return 0.0
    hits = sum(answer_in_passages(list(p)[:k], a) for p, a in zip(retrieved, answers))
    return hits / len(retrieved)


def score_predictions(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 over a set of predictions."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    n = max(len(predictions), 1)
    return {
        "em": sum(exact_match(p, a) for p, a in zip(predictions, answers)) / n,
        "f1": sum(f1_score(p, a) for p, a in zip(predictions, answers)) / n,
    }
