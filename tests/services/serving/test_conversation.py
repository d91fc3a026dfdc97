"""Chat follow-ups: the conversation guides retrieval (real MiniLM) and reaches the generator
within its budget; system messages are ignored; citations stay per turn."""

from __future__ import annotations

import numpy as np
import pytest

from services.serving.conversation import (
    HISTORY_WORDS,
    Turn,
    conversation,
    generator_question,
    retrieval_query,
)

HAMLET = [("user", "Who wrote Hamlet?"), ("assistant", "William Shakespeare wrote Hamlet. [1]")]
FOLLOW_UP = [*HAMLET, ("user", "When was he born?")]


def test_a_follow_up_searches_with_what_the_last_answer_added():
    turns = conversation([("system", "Be brief."), *FOLLOW_UP])
    assert turns == [
        Turn("user", "Who wrote Hamlet?"),
        Turn("assistant", "William Shakespeare wrote Hamlet."),
        Turn("user", "When was he born?"),
    ]
    assert retrieval_query(turns) == "When was he born? (William Shakespeare)"
    assert retrieval_query(turns[-1:]) == "When was he born?"
    assert generator_question(turns) == (
        "User: Who wrote Hamlet?\nAssistant: William Shakespeare wrote Hamlet.\nUser: When was he born?"
    )


def test_a_long_conversation_is_cut_to_the_budget_newest_turns_kept():
    said = [("user" if i % 2 == 0 else "assistant", f"turn{i} " + "word " * 9) for i in range(400)]
    turns = conversation([*said, ("user", "and now?")])
    question = generator_question(turns)
    kept = question.splitlines()
    assert kept[-1] == "User: and now?" and kept[-2].startswith("Assistant: turn399 ")
    assert len(kept) - 1 == HISTORY_WORDS // 10  # whole 10-word turns that fit
    assert sum(len(line.split()) - 1 for line in kept[:-1]) <= HISTORY_WORDS


def test_the_app_passes_the_conversation_and_ignores_system_messages(client, backend):
    said = [("user" if i % 2 == 0 else "assistant", f"turn{i} " + "word " * 9) for i in range(400)]
    messages = [{"role": "system", "content": "Answer in French."}]
    messages += [{"role": role, "content": text} for role, text in said]
    messages.append({"role": "user", "content": "capital of Peru"})
    response = client.post("/v1/chat/completions", json={"messages": messages, "n_docs": 2})
    assert response.status_code == 200, response.text
    (question,) = backend.generator.deployment.engine.batches[-1]
    assert question.endswith("\nUser: capital of Peru") and "turn399" in question
    assert "French" not in question and "turn0 " not in question
    assert response.json()["docs"][0]["title"] == "Peru"  # this turn's passages, cited from 1
    assert response.json()["citations"] == [1]


@pytest.mark.slow
def test_the_hamlet_follow_up_retrieves_shakespeare_with_the_real_encoder():
    """Over the default corpus's Hamlet, Shakespeare and people's-birth passages and 300 others, the
    follow-up alone finds other people; with the conversation, William Shakespeare comes first."""
    from cluster.encoders import TextEncoder
    from cluster.passages import load_corpus, passage_text

    people = {"Hamlet", "William Shakespeare", "Hipparchus", "Pope Gregory VII", "Stephen I of Hungary"}
    corpus = [p for p in load_corpus("default") if p.title in people or p.id % 40 == 0]
    encoder = TextEncoder.from_pretrained("default").eval()
    passages = encoder.encode([passage_text(p) for p in corpus])  # (N, d)

    def top(query: str) -> str:
        return corpus[int(np.argmax(passages @ encoder.encode([query])[0]))].title

    assert top("When was he born?") != "William Shakespeare"
    assert top(retrieval_query(conversation(FOLLOW_UP))) == "William Shakespeare"
