"""Every prediction of an evaluation, one JSONL file per row, and the table cells computed from them.

A line: question, gold answers, prediction, its EM and F1, the passages the generator read (title, text,
p(z|x); none closed-book) and whether a gold answer is in them. The table's intervals and paired tests
are computed from these files, so anyone can recompute them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from cluster.passages import Passage, passage_text
from training.data import QAExample, write_jsonl
from training.scoring import answer_in_passages, exact_match, f1_score
from training.stats import compare, interval


def _rows(
    examples: Sequence[QAExample], predictions: Sequence[str], passages: Sequence[list[dict]]
) -> list[dict]:
    rows = []
    for example, prediction, read in zip(examples, predictions, passages):
        answers = list(example.answers)
        rows.append(
            {
                "question": example.input,
                "gold": answers,
                "prediction": prediction,
                "em": exact_match(prediction, answers),
                "f1": f1_score(prediction, answers),
                "passages": read,
                "answer_in_passages": answer_in_passages(
                    [passage_text(Passage(0, p["title"], p["text"])) for p in read], answers
                ),
            }
        )
    return rows


def write_predictions(
    report: dict, examples: Sequence[QAExample], folder: Path, prefix: str
) -> dict[str, str]:
    """Move the predictions of `report` (from evaluate(keep_predictions=True)) into
    folder/PREFIX_SETTING.jsonl (PREFIX_SETTING_kN for a setting's narrower n_docs rows); return
    {row name: path}, also recorded in the report under "predictions"."""
    folder.mkdir(parents=True, exist_ok=True)
    passages = report.pop("passages")
    written = {}
    for setting, row in report["settings"].items():
        widest = max(int(n) for n in row["by_n_docs"])
        for n_docs, part in row["by_n_docs"].items():
            name = f"{prefix}_{setting}" + ("" if int(n_docs) == widest else f"_k{n_docs}")
            read = (
                [[] for _ in examples] if setting == "closed_book" else [p[: int(n_docs)] for p in passages]
            )
            path = folder / f"{name}.jsonl"
            write_jsonl(path, _rows(examples, part.pop("predictions"), read))
            written[name] = str(path)
    report["predictions"] = written
    return written


def read_predictions(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def cells(rows: Sequence[dict]) -> dict[str, dict]:
    """EM, F1 and (with passages) the answer-in-passages rate, each with its 95% bootstrap interval."""
    out = {"em": interval([r["em"] for r in rows]), "f1": interval([r["f1"] for r in rows])}
    if any(r["passages"] for r in rows):
        out["recall"] = interval([float(r["answer_in_passages"]) for r in rows])
    return out


def paired(reference: Sequence[dict], other: Sequence[dict]) -> dict:
    """The reference row against another on the same questions (EM): McNemar p and bootstrap difference."""
    if [r["question"] for r in reference] != [r["question"] for r in other]:
        raise ValueError("paired test: the two prediction files hold different questions")
    return compare([r["em"] for r in reference], [r["em"] for r in other])
