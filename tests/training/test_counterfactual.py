"""training/counterfactual.py: answer kinds, same-kind seeded substitutes, whole-word one-pass edits and
the follow/keep rates, checked on hand-made passages."""

from __future__ import annotations

import pytest

from training.counterfactual import answer_kind, edit_passages, follow_keep_rates, substitutes

TRAIN = ["1879", "1901", "42", "3,000", "Thomas Edison", "Marie Curie", "blue", "a steam turbine"]


@pytest.mark.parametrize(
    "text, kind",
    [
        ("1856", "year"),
        ("2018", "year"),
        ("3000", "number"),
        ("12.5%", "number"),
        ("1,200", "number"),
        ("Nikola Tesla", "name"),
        ("George Westinghouse Jr.", "name"),
        ("Tesla", "other"),
        ("alternating current", "other"),
        ("the 1880s", "other"),
        ("July 10, 1856", "other"),
    ],
)
def test_answer_kind(text, kind):
    assert answer_kind(text) == kind


def test_substitutes_are_of_the_same_kind_seeded_and_never_a_gold_text():
    gold = ["1856", "Nikola Tesla", "7", "alternating current", "1879"]
    chosen = substitutes(gold, TRAIN, seed=0)
    assert chosen == substitutes(list(reversed(gold)), TRAIN, seed=0)  # deterministic, order-free
    for text, substitute in chosen.items():
        assert answer_kind(substitute) == answer_kind(text) and substitute not in gold
    assert chosen["1856"] == "1901"  # 1879 is a gold text, so not a substitute
    assert chosen["Nikola Tesla"] in {"Thomas Edison", "Marie Curie"}
    seeds = {substitutes(["Nikola Tesla"], TRAIN, seed=s)["Nikola Tesla"] for s in range(20)}
    assert seeds == {"Thomas Edison", "Marie Curie"}  # the seed draws among the pool


def test_edit_replaces_every_whole_word_span_in_one_pass():
    passages = [
        {"title": "Nikola Tesla", "text": "Nikola Tesla was born in 1856. In 18560 nothing."},
        {"title": "Other", "text": "Tesla met Thomas Edison; 1856 again."},
        {"title": "Colour", "text": "The sky is green."},
    ]
    answers = [["1856"], ["Nikola Tesla", "Tesla"], ["green"], ["purple"]]
    edited, substituted = edit_passages(passages, answers, TRAIN, seed=0)
    year, name = substituted[0], substituted[1]
    assert year == "1901" and name in {"Thomas Edison", "Marie Curie"}
    assert edited[0]["text"].startswith(f"{name} was born in {year}.") and "18560" in edited[0]["text"]
    assert f"; {year} again" in edited[1]["text"]
    assert substituted[2] == "blue" and edited[2]["text"] == "The sky is blue."
    assert substituted[3] is None  # "purple" is in no passage
    # "Tesla" alone (a gold variant, kind other) is edited too, so the old name is nowhere
    assert all("Tesla" not in p["text"] and "Tesla" not in p["title"] for p in edited)
    assert edit_passages(passages, answers, TRAIN, seed=0) == (edited, substituted)
    assert passages[2]["text"] == "The sky is green."  # the input is not changed


def test_follow_and_keep_rates_count_only_edited_questions():
    rates = follow_keep_rates(
        ["1901", "Nikola Tesla", "the 1901", "x"],
        [["1856"], ["Nikola Tesla"], ["1856"], ["y"]],
        ["1901", "Marie Curie", "1901", None],
    )
    assert rates == {"edited_questions": 3, "follow_rate": 2 / 3, "keep_rate": 1 / 3}
    with pytest.raises(ValueError, match="2 predictions"):
        follow_keep_rates(["a", "b"], [["a"]], [None])
