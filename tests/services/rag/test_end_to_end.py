"""The real default models end to end: MiniLM retrieval over Wikipedia leads, SmolLM2 RAG-Sequence."""

from __future__ import annotations

import pytest

from cluster.passages import load_corpus
from services.rag.local import LocalConfig, LocalRag

QUESTION = "Who directed 2001: A Space Odyssey?"


@pytest.mark.slow
def test_default_models_answer_who_directed_2001() -> None:
    corpus = load_corpus("default")
    relevant = [p for p in corpus if "2001" in p.title or "Kubrick" in p.title]
    others = [p for p in corpus if p not in relevant][::50][:200]
    assert relevant and len(others) == 200
    rag = LocalRag(relevant + others, LocalConfig(n_docs=5, mode="sequence", decoding="thorough"))
    [answer] = rag.ask([QUESTION])
    titles = [source.title for source in answer.sources]
    assert len(titles) == 5 and titles[0] == "2001: A Space Odyssey", titles
    assert [s.score for s in answer.sources] == sorted((s.score for s in answer.sources), reverse=True)
    assert "kubrick" in answer.answer.lower(), answer.answer
