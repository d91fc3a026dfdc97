"""QA training and evaluation data: SQuAD-format .json or JSONL question/answer pairs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster.passages import jsonl_rows, squad_articles, squad_dev_path


@dataclass(frozen=True)
class QAExample:
    """A question with every accepted answer (at least one)."""

    question: str
    answers: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise ValueError(f"empty question: {self.question!r}")
        if not self.answers or not all(a.strip() for a in self.answers):
            raise ValueError(f"question {self.question!r} has no answers: {self.answers!r}")


def _unique(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.strip() for t in texts if t.strip()))


def _squad_qa(path: Path) -> Iterator[QAExample]:
    for article in squad_articles(path):
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = _unique(a.get("text", "") for a in qa.get("answers", []))
                if not answers:
                    raise ValueError(f"{str(path)!r}: question {qa.get('id')!r} has no answers")
                yield QAExample(question=qa["question"], answers=answers)


def _jsonl_qa(path: Path) -> Iterator[QAExample]:
    for number, row in jsonl_rows(path):
        question, answers = row.get("question"), row.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{str(path)!r} line {number} has no question: {question!r}")
        if not isinstance(answers, list) or not _unique(str(a) for a in answers):
            raise ValueError(f"{str(path)!r} line {number} has no answers: {answers!r}")
        yield QAExample(question=question, answers=_unique(str(a) for a in answers))


def load_qa(path: str) -> list[QAExample]:
    """Question/answer pairs from SQuAD-format .json, JSONL {"question","answers"}, or "squad-dev"."""
    file = squad_dev_path() if path == "squad-dev" else Path(path)
    if not file.is_file() or file.suffix not in (".json", ".jsonl"):
        raise ValueError(f"unknown QA data {path!r}: expected 'squad-dev', a .json or .jsonl file")
    examples = list(_squad_qa(file) if file.suffix == ".json" else _jsonl_qa(file))
    if not examples:
        raise ValueError(f"QA data {path!r} is empty")
    return examples
