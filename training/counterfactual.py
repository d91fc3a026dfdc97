"""The counterfactual index edit: each test answer span replaced by another answer of the same kind.

Every distinct gold answer text of the test questions gets one substitute, drawn (seeded by the text)
from the training answers of the same kind that are no test answer. Kinds, decided on the text alone:
"year" (four digits, 1000-2099), "number" (digits with optional , . % signs), "name" (two to four
words, each starting with a capital letter, no digits: persons, places, organisations alike), "other".
The edit rewrites the given passages (titles and texts) in one pass, longest gold text first, whole
words only, so a substitute is never itself rewritten. A question's substituted answer is that of its
first gold answer.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np

from training.scoring import exact_match, normalize_answer

Kind = Literal["year", "number", "name", "other"]
_YEAR = re.compile(r"^(1\d{3}|20\d{2})$")
_NUMBER = re.compile(r"^[\d.,%]*\d[\d.,%]*$")
_NAME_WORD = re.compile(r"^[A-Z][A-Za-z.'\-]*$")


def answer_kind(text: str) -> Kind:
    """year, number, name (2-4 capitalised words) or other."""
    text = text.strip()
    if _YEAR.match(text):
        return "year"
    if _NUMBER.match(text):
        return "number"
    words = text.split()
    if 2 <= len(words) <= 4 and all(_NAME_WORD.match(w) for w in words):
        return "name"
    return "other"


def substitutes(gold_texts: Sequence[str], train_answers: Sequence[str], seed: int) -> dict[str, str]:
    """For each gold text, a training answer of its kind that is no gold text (none when its kind has
    no such answer)."""
    taken = {normalize_answer(t) for t in gold_texts}
    pools: dict[Kind, list[str]] = {}
    for answer in sorted({a.strip() for a in train_answers}):
        if answer and normalize_answer(answer) not in taken:
            pools.setdefault(answer_kind(answer), []).append(answer)
    chosen = {}
    for text in sorted(set(gold_texts)):
        pool = pools.get(answer_kind(text), [])
        if pool:
            rng = np.random.default_rng([seed, zlib.crc32(text.encode("utf-8"))])
            chosen[text] = pool[int(rng.integers(len(pool)))]
    return chosen


def _pattern(texts: Sequence[str]) -> re.Pattern[str]:
    """Any of the texts as whole words, the longest first."""
    ordered = sorted(texts, key=lambda t: (-len(t), t))
    return re.compile(r"(?<!\w)(" + "|".join(re.escape(t) for t in ordered) + r")(?!\w)")


def edit_passages(
    passages: Sequence[dict], answers: Sequence[Sequence[str]], train_answers: Sequence[str], seed: int
) -> tuple[list[dict], list[str | None]]:
    """The passages ({title, text}) with every gold span replaced, and per question the substitute of
    its first gold answer (None when that answer occurs in no passage or its kind has no substitute)."""
    gold = sorted({a.strip() for row in answers for a in row if a.strip()})
    chosen = substitutes(gold, train_answers, seed)
    if not chosen:
        return [dict(p) for p in passages], [None] * len(answers)
    pattern = _pattern(list(chosen))
    replace = lambda match: chosen[match.group(1)]
    edited, found = [], set()
    for passage in passages:
        for field in ("title", "text"):
            found.update(m.group(1) for m in pattern.finditer(passage[field]))
        edited.append({**passage, **{f: pattern.sub(replace, passage[f]) for f in ("title", "text")}})
    per_question = [
        chosen.get(row[0].strip()) if row and row[0].strip() in found else None for row in answers
    ]
    return edited, per_question


def follow_keep_rates(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], substituted: Sequence[str | None]
) -> dict[str, float | int]:
    """Over the edited questions: the share of predictions equal (SQuAD-normalised) to the substitute
    (follow) and to an original gold answer (keep)."""
    if not len(predictions) == len(answers) == len(substituted):
        raise ValueError(
            f"{len(predictions)} predictions, {len(answers)} answer lists, {len(substituted)} substitutes"
        )
    rows = [(p, a, s) for p, a, s in zip(predictions, answers, substituted) if s is not None]
    n = max(len(rows), 1)
    return {
        "edited_questions": len(rows),
        "follow_rate": sum(exact_match(p, [s]) for p, _, s in rows) / n,
        "keep_rate": sum(exact_match(p, a) for p, a, _ in rows) / n,
    }
