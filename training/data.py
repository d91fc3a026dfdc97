"""Task data: QA pairs from SQuAD-format .json or JSONL, article splits, and labelled claims (JSONL)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cluster.passages import is_json_file, jsonl_rows, squad_articles, squad_dev_path

BUILTIN_QA = "squad-dev"  # SQuAD v1.1 dev
BUILTIN_CLAIMS = "claims"  # the claims shipped in this package (shipped/README.md)
BUILTIN_DATA = (BUILTIN_QA, BUILTIN_CLAIMS)  # data specs that name shipped data, not a file
SHIPPED_CLAIMS = Path(__file__).resolve().parent / "shipped" / "claims.jsonl"
Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)
TEST_EVERY = 5  # about one SQuAD article in five is in the test split


@dataclass(frozen=True)
class QAExample:
    """An input with every accepted target (at least one): a question and its answers for QA, an answer
    and its question for question generation, a claim and its label for classification."""

    input: str  # what the model reads beside the passages
    answers: tuple[str, ...]  # the targets it may generate

    def __post_init__(self) -> None:
        if not self.input.strip():
            raise ValueError(f"empty input: {self.input!r}")
        if not self.answers or not all(a.strip() for a in self.answers):
            raise ValueError(f"input {self.input!r} has no answers: {self.answers!r}")


def split_spec(spec: str) -> tuple[str, Split | None]:
    """A data spec's source and article split: "squad-dev:test" -> ("squad-dev", "test")."""
    for split in SPLITS:
        if spec.endswith(f":{split}"):
            return spec[: -len(split) - 1], split
    return spec, None


def article_split(title: str) -> Split:
    """The split of a SQuAD article, fixed by its title (a hash, so independent of file order)."""
    digest = int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16)
    return "test" if digest % TEST_EVERY == 0 else "train"


def _unique(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.strip() for t in texts if t.strip()))


def squad_qa_by_article(path: Path, split: Split | None = None) -> Iterator[tuple[str, list[QAExample]]]:
    """(title, its questions) of each article of a SQuAD-format file, those of `split` when given."""
    for article in squad_articles(path):
        title = article.get("title", "")
        if split is not None and article_split(title) != split:
            continue
        examples = []
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = _unique(a.get("text", "") for a in qa.get("answers", []))
                if not answers:
                    raise ValueError(f"{str(path)!r}: question {qa.get('id')!r} has no answers")
                examples.append(QAExample(input=qa["question"], answers=answers))
        yield title, examples


def _jsonl_qa(path: Path) -> Iterator[QAExample]:
    for number, row in jsonl_rows(path):
        question, answers = row.get("question"), row.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{str(path)!r} line {number} has no question: {question!r}")
        if not isinstance(answers, list) or not _unique(str(a) for a in answers):
            raise ValueError(f"{str(path)!r} line {number} has no answers: {answers!r}")
        yield QAExample(input=question, answers=_unique(str(a) for a in answers))


def _qa_source(path: str) -> tuple[Path, Split | None]:
    """The file and article split of a QA data spec ("squad-dev" or a path, then ":train" / ":test" for
    SQuAD-format data)."""
    source, split = split_spec(path)
    file = squad_dev_path() if source == BUILTIN_QA else Path(source)
    if not file.is_file() or not (is_json_file(file) or file.suffix == ".jsonl"):
        raise ValueError(f"unknown QA data {path!r}: expected 'squad-dev', a .json[.gz] or .jsonl file")
    if split is not None and not is_json_file(file):
        raise ValueError(f"QA data {path!r}: an article split (':{split}') needs SQuAD-format .json data")
    return file, split


def load_qa(path: str) -> list[QAExample]:
    """Question/answer pairs from SQuAD-format .json, JSONL {"question","answers"}, or "squad-dev";
    SQuAD-format data may name an article split: "squad-dev:train", "squad-dev:test" (`article_split`)."""
    file, split = _qa_source(path)
    if is_json_file(file):
        examples = [e for _, article in squad_qa_by_article(file, split) for e in article]
    else:
        examples = list(_jsonl_qa(file))
    if not examples:
        raise ValueError(f"QA data {path!r} is empty")
    return examples


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, UTF-8 (what load_qa and load_corpus read back)."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def load_claims(path: str) -> list[QAExample]:
    """Labelled claims from JSONL {"claim": "...", "label": "..."}, or "claims" (the shipped ones): the
    claim is the input, the label word the target."""
    file = SHIPPED_CLAIMS if path == BUILTIN_CLAIMS else Path(path)
    if not file.is_file() or file.suffix != ".jsonl":
        raise ValueError(
            f"unknown claims data {path!r}: expected {BUILTIN_CLAIMS!r} or a .jsonl file of {{claim, label}}"
        )
    examples = []
    for number, row in jsonl_rows(file):
        claim, label = row.get("claim"), row.get("label")
        if not isinstance(claim, str) or not claim.strip():
            raise ValueError(f"{path!r} line {number} has no claim: {claim!r}")
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"{path!r} line {number} has no label: {label!r}")
        examples.append(QAExample(input=claim, answers=(label.strip(),)))
    if not examples:
        raise ValueError(f"claims data {path!r} is empty")
    return examples
