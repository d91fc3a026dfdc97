"""How a chat's earlier turns reach retrieval and the generator.

- Retrieval searches with the question (the last user message) followed by what the latest answer
  added to the question it answered: the answer's words that the question did not have. After
  "Who wrote Hamlet?" / "William Shakespeare wrote Hamlet.", the follow-up "When was he born?"
  searches with "When was he born? (William Shakespeare)".
- The generator reads the earlier turns, newest first while they fit in `HISTORY_WORDS` words, as
  "User: …" / "Assistant: …" lines before the question; older turns are left out, not refused.
- System, developer and tool messages are ignored: answers come from the retrieved passages.
- Citation marks ("[2]") in earlier answers are dropped: they pointed at that turn's passages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

HISTORY_WORDS = 96
CITATION = re.compile(r"\s*\[\d+\]")


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str


def conversation(messages: list[tuple[str, str]]) -> list[Turn]:
    """(role, text) messages → the user and assistant turns up to the last user turn, which is the
    question; ValueError when there is none."""
    turns = [
        Turn(role, CITATION.sub("", text).strip() if role == "assistant" else text.strip())
        for role, text in messages
        if role in ("user", "assistant")
    ]
    users = [i for i, turn in enumerate(turns) if turn.role == "user"]
    if not users:
        raise ValueError("no message with role 'user'")
    return [turn for turn in turns[: users[-1]] if turn.text] + [turns[users[-1]]]


def retrieval_query(turns: list[Turn]) -> str:
    """The question, then (in parentheses) the words the latest answer added to its question."""
    *earlier, question = turns
    if len(earlier) < 2 or (earlier[-2].role, earlier[-1].role) != ("user", "assistant"):
        return question.text
    asked = {_word(w) for w in earlier[-2].text.split()}
    added = [w.strip(".,;:!?") for w in earlier[-1].text.split() if _word(w) not in asked]
    return f"{question.text} ({' '.join(added)})" if added else question.text


def generator_question(turns: list[Turn], budget_words: int = HISTORY_WORDS) -> str:
    """The earlier turns that fit in `budget_words` (newest first, whole), then the question."""
    *earlier, question = turns
    kept: list[str] = []
    for turn in reversed(earlier):
        budget_words -= len(turn.text.split())
        if budget_words < 0:
            break
        kept.append(f"{turn.role.capitalize()}: {turn.text}")
    if not kept:
        return question.text
    return "\n".join([*reversed(kept), f"User: {question.text}"])


def _word(token: str) -> str:
    return token.strip(".,;:!?\"'()").lower()
