"""Scoring a task's outputs: SQuAD answer normalisation, exact match, token F1, retrieval recall@k (QA);
BLEU-1 and ROUGE-L (question generation); accuracy (label generation)."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU

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


def _check_lengths(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")


def score_predictions(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 over a set of predictions."""
    _check_lengths(predictions, answers)
    n = max(len(predictions), 1)
    return {
        "em": sum(exact_match(p, a) for p, a in zip(predictions, answers)) / n,
        "f1": sum(f1_score(p, a) for p, a in zip(predictions, answers)) / n,
    }


def score_generations(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1 (sacrebleu: 13a tokens, case kept, brevity penalty) and the mean over predictions of
    the best ROUGE-L F-measure against any reference (rouge-score, no stemming), both in [0, 1]."""
    _check_lengths(predictions, references)
    if not predictions:
        return {"bleu1": 0.0, "rougeL": 0.0}
    width = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(width)]
    bleu = BLEU(max_ngram_order=1).corpus_score(list(predictions), streams).score / 100
    scorer = RougeScorer(["rougeL"])
    rouge = [scorer.score_multi(list(r), p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return {"bleu1": bleu, "rougeL": sum(rouge) / len(rouge)}


def score_labels(predictions: Sequence[str], labels: Sequence[Sequence[str]]) -> dict[str, float]:
    """Accuracy: the fraction of predicted labels equal to the gold label."""
    _check_lengths(predictions, labels)
    correct = sum(p in gold for p, gold in zip(predictions, labels))
    return {"accuracy": correct / max(len(predictions), 1)}
