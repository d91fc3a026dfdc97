"""Chunking and corpus/QA loading: word limits, stable ids, titles, and bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import cluster
from cluster.passages import Passage, chunk_documents, load_corpus, passage_text, squad_dev_path
from training.data import QAExample, load_qa


def _words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def test_chunks_keep_every_word_in_order_within_the_limit() -> None:
    docs = [("A", _words(250, "a")), ("B", _words(100, "b")), ("C", "one")]
    passages = chunk_documents(docs, max_words=100)
    assert [p.id for p in passages] == list(range(len(passages)))
    assert all(len(p.text.split()) <= 100 for p in passages)
    for title, text in docs:
        joined = " ".join(p.text for p in passages if p.title == title)
        assert joined == text
    # 250 words → 3 balanced chunks (83/83/84), not 100/100/50; 100 words stay one passage
    assert [len(p.text.split()) for p in passages if p.title == "A"] == [83, 83, 84]
    assert [p.title for p in passages].count("B") == 1


def test_ids_are_stable_under_limit_and_appended_documents() -> None:
    docs = [(f"T{i}", _words(30 + 17 * i)) for i in range(12)]
    full = chunk_documents(docs, max_words=40)
    longer = chunk_documents(docs + [("new", _words(90))], max_words=40)
    assert longer[: len(full)] == full


def test_empty_document_text_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'Empty'"):
        chunk_documents([("Fine", "some words"), ("Empty", "   ")])
    with pytest.raises(ValueError, match="max_words"):
        chunk_documents([("x", "y")], max_words=0)


def test_passage_text_prefixes_the_title() -> None:
    assert passage_text(Passage(0, "Kubrick", "He directed films.")) == "Kubrick. He directed films."
    assert passage_text(Passage(0, "", "Untitled text.")) == "Untitled text."


def test_default_corpus_prefix_matches_the_shipped_file() -> None:
    passages = load_corpus("default", limit=50)
    assert len(passages) == 50 and [p.id for p in passages] == list(range(50))
    assert all(0 < len(p.text.split()) <= 100 for p in passages)
    first = passages[0]
    assert first.title == "20th-century classical music"
    assert first.text.startswith("20th-century classical music is Western art music")


def test_jsonl_corpus(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": "a", "title": "Alpha", "text": _words(150)}, {"id": "b", "title": "Beta", "text": "short"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    passages = load_corpus(str(path))
    assert [(p.id, p.title) for p in passages] == [(0, "Alpha"), (1, "Alpha"), (2, "Beta")]
    assert load_corpus(str(path), limit=1) == passages[:1]


def test_jsonl_row_without_text_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    rows = [{"id": "ok", "title": "t", "text": "x"}, {"id": "row-7", "title": "t"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="line 2.*'row-7'"):
        load_corpus(str(path))


def test_empty_corpus_and_unknown_spec(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(empty))
    with pytest.raises(ValueError, match="'wikipedia-2030'"):
        load_corpus("wikipedia-2030")
    with pytest.raises(ValueError, match="limit"):
        load_corpus("default", limit=0)


def _squad_file(tmp_path: Path, answers: list[dict]) -> Path:
    data = {
        "data": [
            {
                "title": "Super_Bowl_50",
                "paragraphs": [
                    {
                        "context": "Denver won. " + _words(120),
                        "qas": [{"id": "q1", "question": "Who won?", "answers": answers}],
                    },
                    {"context": "A second paragraph.", "qas": []},
                ],
            }
        ]
    }
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path


def test_squad_file_as_corpus_and_qa(tmp_path: Path) -> None:
    path = _squad_file(tmp_path, [{"text": "Denver"}, {"text": "Denver"}, {"text": "the Broncos"}])
    passages = load_corpus(str(path))
    assert [p.title for p in passages] == ["Super Bowl 50"] * 3
    assert passages[0].text.startswith("Denver won.")
    assert load_qa(str(path)) == [QAExample("Who won?", ("Denver", "the Broncos"))]


def test_gzipped_squad_file_reads_as_the_plain_one(tmp_path: Path) -> None:
    plain = _squad_file(tmp_path, [{"text": "Denver"}])
    packed = tmp_path / "squad.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_corpus(str(packed)) == load_corpus(str(plain))
    assert load_qa(f"{packed}:train") == load_qa(f"{plain}:train")
    assert load_qa(str(packed)) == load_qa(str(plain))
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(plain.read_bytes())  # not gzip
    with pytest.raises(ValueError, match="broken.json.gz"):
        load_qa(str(broken))


def test_squad_question_without_answers_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'q1'"):
        load_qa(str(_squad_file(tmp_path, [])))


def test_jsonl_qa(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps({"question": "Q1?", "answers": ["a", "b"]})
        + "\n"
        + json.dumps({"question": "Q2?", "answers": "c"})
        + "\n"
    )
    assert load_qa(str(path)) == [QAExample("Q1?", ("a", "b")), QAExample("Q2?", ("c",))]
    path.write_text(json.dumps({"question": "Q3?", "answers": []}) + "\n")
    with pytest.raises(ValueError, match="line 1 has no answers"):
        load_qa(str(path))
    with pytest.raises(ValueError, match="no answers"):
        QAExample("Q?", ())
    with pytest.raises(ValueError, match="'missing.json'"):
        load_qa("missing.json")


def test_squad_dev_ships_in_the_package_and_the_variable_overrides_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAYRAG_SQUAD", str(tmp_path / "nowhere.json"))
    with pytest.raises(ValueError, match="nowhere.json.*bigbench"):
        load_corpus("squad-open")
    monkeypatch.delenv("RAYRAG_SQUAD")
    assert squad_dev_path().is_relative_to(Path(cluster.__file__).parent)
    qa = load_qa("squad-dev")
    assert len(qa) == 10565
    assert qa[0] == QAExample("Which NFL team represented the AFC at Super Bowl 50?", ("Denver Broncos",))
    corpus = load_corpus("squad-open")
    assert len({(p.title, p.text) for p in corpus}) > 2000
