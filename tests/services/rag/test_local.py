"""`rayrag ask --local` on tiny models: flat retrieval against brute force, the vector cache, the CLI."""

from __future__ import annotations

import json

import bm25s
import numpy as np
import pytest

import rayrag_cli
from cluster.bm25 import Bm25Params, tokenize
from cluster.encoders import TextEncoder
from cluster.passages import load_corpus, passage_text
from services.rag import local
from services.rag.config import DecodingConfig
from services.rag.generator import make_generator
from services.rag.loading import load_generator
from services.rag.local import LocalConfig, LocalRag
from services.rag.model import default_doc_score_scale, generate_answers
from tests.tiny_models import save_tiny_encoder, save_tiny_generator

QUESTIONS = ["where is the tower", "who wrote the book"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("local")
    corpus = root / "corpus.jsonl"
    rows = [
        {"id": str(i), "title": f"Doc {i}", "text": f"passage {i} about topic {i % 7} " * (5 + i % 30)}
        for i in range(40)
    ]
    corpus.write_text("\n".join(json.dumps(r) for r in rows))
    return {
        "corpus": str(corpus),
        "encoder": save_tiny_encoder(root / "encoder", dim=32, seed=0),
        "generator": save_tiny_generator(root / "generator", kind="causal"),
        "cache": str(root / "cache"),
    }


def _config(setup: dict[str, str], **overrides) -> LocalConfig:
    options = {
        "corpus": setup["corpus"],
        "query_encoder": setup["encoder"],
        "generator": setup["generator"],
        "cache_dir": setup["cache"],
        "n_docs": 3,
        "num_beams": 2,
        "max_new_tokens": 4,
        "precision": "float32",  # the same arithmetic on every CPU
    }
    return LocalConfig(**(options | overrides))


def test_retrieval_equals_brute_force_and_vectors_are_cached(
    setup: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rag = LocalRag.from_config(_config(setup))
    encoder = TextEncoder.from_pretrained(setup["encoder"])
    docs = encoder.encode([passage_text(p) for p in load_corpus(setup["corpus"])])  # (N, d)
    np.testing.assert_allclose(rag.vectors, docs, atol=1e-5)
    found = rag.retrieve(QUESTIONS)
    brute = encoder.encode(QUESTIONS) @ docs.T  # (B, N)
    rows = np.argsort(-brute, axis=1, kind="stable")[:, :3]  # (B, 3)
    np.testing.assert_array_equal(found.ids, [[rag.passages[r].id for r in row] for row in rows])
    np.testing.assert_allclose(found.scores, np.take_along_axis(brute, rows, axis=1), atol=1e-5)
    np.testing.assert_allclose(found.doc_scores, rag.rag.doc_score_scale * found.scores, atol=1e-4)

    def no_encoding(*args, **kwargs):
        raise AssertionError("document vectors should come from the cache")

    monkeypatch.setattr(local, "_encode_with_progress", no_encoding)
    np.testing.assert_array_equal(LocalRag.from_config(_config(setup)).vectors, rag.vectors)


@pytest.mark.parametrize(
    "mode, decoding", [("sequence", "fast"), ("sequence", "thorough"), ("token", "fast")]
)
def test_ask_answers_as_the_model_does_from_brute_force_top_k(
    setup: dict[str, str], mode: str, decoding: str
) -> None:
    """The reference: brute-force top-3, scale · q·d doc scores, `generate_answers` on a generator
    loaded apart, with the same decoding settings."""
    answers = LocalRag.from_config(_config(setup, mode=mode, decoding=decoding)).ask(QUESTIONS)
    passages = load_corpus(setup["corpus"])
    encoder = TextEncoder.from_pretrained(setup["encoder"])
    docs = encoder.encode([passage_text(p) for p in passages])  # (N, d)
    queries = encoder.encode(QUESTIONS)  # (B, d)
    brute = queries @ docs.T  # (B, N)
    rows = np.argsort(-brute, axis=1, kind="stable")[:, :3]  # (B, K)
    doc_scores = default_doc_score_scale(encoder) * np.einsum("bd,bkd->bk", queries, docs[rows])  # (B, K)
    model, tokenizer = load_generator(setup["generator"])
    expected = generate_answers(
        make_generator(model, tokenizer),
        QUESTIONS,
        [[passages[r].title for r in row] for row in rows],
        [[passages[r].text for r in row] for row in rows],
        doc_scores,
        DecodingConfig(mode=mode, decoding=decoding, num_beams=2, max_new_tokens=4),
    )
    assert [a.answer for a in answers] == expected
    for answer, row, row_scores in zip(answers, rows, np.take_along_axis(brute, rows, axis=1)):
        assert [s.id for s in answer.sources] == [passages[r].id for r in row]
        np.testing.assert_allclose([s.score for s in answer.sources], row_scores, atol=1e-5)


def test_cli_ask_prints_answer_and_sources(setup: dict[str, str], capsys: pytest.CaptureFixture) -> None:
    argv = [
        "ask",
        "--local",
        QUESTIONS[0],
        "--corpus",
        setup["corpus"],
        "--query-encoder",
        setup["encoder"],
        "--generator",
        setup["generator"],
        "--cache-dir",
        setup["cache"],
        "--n-docs",
        "2",
        "--num-beams",
        "2",
        "--max-new-tokens",
        "3",
    ]
    assert rayrag_cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Answer:") and lines[1] == "Sources (dense retriever):"
    assert len(lines) == 4 and lines[2].startswith("  1. Doc ") and "(dense, q·d " in lines[2]
    assert rayrag_cli.main([*argv, "--retriever", "hybrid"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "Sources (hybrid retriever):" and ", fused " in lines[2]


def test_bm25_and_hybrid_find_the_passage_holding_the_words(setup: dict[str, str]) -> None:
    """BM25 agrees with bm25s's own Lucene BM25 over the whole corpus; hybrid keeps BM25's find."""
    question = ["passage 17 about topic"]  # "17" is in document 17's passages only
    bm25 = LocalRag.from_config(_config(setup, retrieval={"retriever": "bm25"}))
    found = bm25.retrieve(question)
    library = bm25s.BM25(method="lucene")
    library.index(tokenize([passage_text(p) for p in bm25.passages], Bm25Params()), show_progress=False)
    expected = library.get_scores(tokenize(question, Bm25Params())[0])  # (N,)
    best = int(np.argmax(expected))
    assert found.ids[0, 0] == bm25.passages[best].id and "passage 17 " in bm25.passages[best].text
    assert found.found_by[0].tolist() == ["bm25"] * 3
    np.testing.assert_allclose(found.scores[0], expected[found.ids[0]], rtol=1e-5)
    np.testing.assert_allclose(found.doc_scores, found.scores)  # temperature 1: BM25 scores are the logits
    hybrid = LocalRag.from_config(
        _config(setup, retrieval={"retriever": "hybrid", "fusion": "rrf"})
    ).retrieve(question)
    slot = hybrid.ids[0].tolist().index(found.ids[0, 0])  # BM25's best is among hybrid's
    assert "bm25" in hybrid.found_by[0][slot]


def test_bad_input(setup: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="n_docs=1000 exceeds the corpus size"):
        LocalRag.from_config(_config(setup, n_docs=1000))
    with pytest.raises(ValueError, match="'beam'"):
        _config(setup, mode="beam")
