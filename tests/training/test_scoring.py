"""EM / F1 with SQuAD normalisation, recall@k, BLEU-1 / ROUGE-L and accuracy, against hand-worked cases."""

from __future__ import annotations

import math

import pytest

from training.scoring import (
    exact_match,
    f1_score,
    normalize_answer,
    recall_at_k,
    score_generations,
    score_labels,
    score_predictions,
)


def test_normalisation_matches_squad():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an Apple, a day") == "apple day"


def test_exact_match_and_f1():
    assert exact_match("the Beatles", ["Beatles", "The Fab Four"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    # prediction "beatles band" vs gold "beatles": precision 1/2, recall 1 → F1 2/3
    assert f1_score("Beatles band", ["Beatles"]) == pytest.approx(2 / 3)
    assert f1_score("nothing", ["Beatles"]) == 0.0
    assert score_predictions(["a cat", "dog"], [["cat"], ["bird"]]) == {"em": 0.5, "f1": 0.5}


def test_recall_at_k_counts_whole_words():
    retrieved = [["Paris is in France", "Berlin"], ["catalogue", "dog house"]]
    assert recall_at_k(retrieved, [["paris"], ["cat"]], k=2) == 0.5
    assert recall_at_k(retrieved, [["Berlin"], ["dog"]], k=1) == 0.0
    assert recall_at_k(retrieved, [["Berlin"], ["dog"]], k=2) == 1.0
    with pytest.raises(ValueError, match="2 retrieval lists for 1 questions"):
        recall_at_k(retrieved, [["x"]], k=1)


def test_bleu1_and_rouge_l():
    # 3 of 4 unigrams match, same length (no brevity penalty); LCS "who the cat" = 3 of 4 both ways
    assert score_generations(["who is the cat"], [["who was the cat"]]) == pytest.approx(
        {"bleu1": 0.75, "rougeL": 0.75}
    )
    # corpus BLEU-1: unigram precision 1, but 2 hypothesis words against 4 reference words: BP = e^(1 - 4/2);
    # ROUGE-L: LCS 2, precision 1, recall 1/2 -> F 2/3
    assert score_generations(["what year"], [["what year was it"]]) == pytest.approx(
        {"bleu1": math.exp(-1), "rougeL": 2 / 3}
    )
    # several references: BLEU counts a word matched in any of them and takes the closest length;
    # ROUGE-L the best reference per prediction, then the mean over predictions
    two = score_generations(["who is the cat", "what year"], [["who was the cat", "is it"], ["what year"]])
    assert two == pytest.approx({"bleu1": 1.0, "rougeL": (0.75 + 1.0) / 2})
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        score_generations(["a", "b"], [["a"]])


def test_accuracy():
    assert score_labels(["true", "false", "true"], [["true"], ["true"], ["true"]]) == {"accuracy": 2 / 3}
