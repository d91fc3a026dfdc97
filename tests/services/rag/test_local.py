"""`rayrag ask --local` on tiny models: flat retrieval against brute force, the vector cache, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

import rayrag_cli
from cluster.encoders import TextEncoder
from cluster.passages import load_corpus, passage_text
from services.rag import local
from services.rag.local import LocalConfig, LocalRag
from tests.tiny_models import save_tiny_encoder, save_tiny_generator

QUESTIONS = ["where is the tower", "who wrote the book"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("local")
    corpus = root / "corpus.jsonl"
    rows = [{"id": str(i), "title": f"Doc {i}", "text": f"passage {i} about topic {i % 7} " * (5 + i % 30)}
            for i in range(40)]
    corpus.write_text("\n".join(json.dumps(r) for r in rows))
    return {
        "corpus": str(corpus),
        "encoder": save_tiny_encoder(root / "encoder", dim=32, seed=0),
        "generator": save_tiny_generator(root / "generator", kind="causal"),
        "cache": str(root / "cache"),
    }


def _config(setup: dict[str, str], **overrides) -> LocalConfig:
    options = dict(corpus=setup["corpus"], encoder=setup["encoder"], generator=setup["generator"],
                   cache_dir=setup["cache"], n_docs=3, num_beams=2, max_new_tokens=4)
    return LocalConfig(**(options | overrides))


def test_retrieval_equals_brute_force_and_vectors_are_cached(setup: dict[str, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rag = LocalRag.from_config(_config(setup))
    encoder = TextEncoder.from_pretrained(setup["encoder"])
    docs = encoder.encode([passage_text(p) for p in load_corpus(setup["corpus"])])  # (N, d)
    np.testing.assert_allclose(rag.vectors, docs, atol=1e-5)
    _, scores, rows = rag.retrieve(QUESTIONS)
    brute = encoder.encode(QUESTIONS) @ docs.T  # (B, N)
    np.testing.assert_array_equal(rows, np.argsort(-brute, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, rows, axis=1), atol=1e-5)

    def no_encoding(*args, **kwargs):
        raise AssertionError("document vectors should come from the cache")

    monkeypatch.setattr(local, "_encode_with_progress", no_encoding)
    np.testing.assert_array_equal(LocalRag.from_config(_config(setup)).vectors, rag.vectors)


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_ask_returns_answers_with_their_sources(setup: dict[str, str], mode: str) -> None:
    rag = LocalRag.from_config(_config(setup, mode=mode))
    answers = rag.ask(QUESTIONS)
    _, scores, rows = rag.retrieve(QUESTIONS)
    for answer, row, row_scores in zip(answers, rows, scores):
        assert isinstance(answer.answer, str)
        assert [s.id for s in answer.sources] == [rag.passages[r].id for r in row]
        np.testing.assert_allclose([s.score for s in answer.sources], row_scores, atol=1e-6)


def test_cli_ask_prints_answer_and_sources(setup: dict[str, str], capsys: pytest.CaptureFixture) -> None:
    argv = ["ask", "--local", QUESTIONS[0], "--corpus", setup["corpus"], "--encoder", setup["encoder"],
            "--generator", setup["generator"], "--cache-dir", setup["cache"], "--n-docs", "2",
            "--num-beams", "2", "--max-new-tokens", "3"]
    assert rayrag_cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Answer:") and lines[1] == "Sources:"
    assert len(lines) == 4 and lines[2].startswith("  1. Doc ")


def test_bad_input(setup: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="n_docs=1000 exceeds the corpus size"):
        LocalRag.from_config(_config(setup, n_docs=1000))
    with pytest.raises(ValueError, match="'beam'"):
        _config(setup, mode="beam")
