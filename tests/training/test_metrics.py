"""EM / F1 with SQuAD normalisation and recall@k, against hand-worked cases."""

from __future__ import annotations

import pytest

from training.metrics import exact_match, f1_score, normalize_answer, recall_at_k, score_predictions


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
