"""The generator engine the Generator deployment runs: its interface, its request, the RAG default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from services.rag.stopping import StopCheck

if TYPE_CHECKING:
    from services.rag.precision import Precision


@dataclass
class GenerateRequest:
    """One question with its K retrieved passages and their doc scores, and how to decode."""

    question: str
    titles: list[str]
    texts: list[str]
    doc_scores: list[float]  # (K,)
    mode: str
    decoding: str
    num_beams: int
    max_new_tokens: int
    deadline: float | None = None  # time.time() past which nobody waits for the answer

    def batch_key(self) -> tuple:
        """Requests with equal keys go to the engine together, in one `generate` call."""
        return (self.mode, self.decoding, self.num_beams, self.max_new_tokens, len(self.titles))


class Engine(Protocol):
    """A loaded generator that answers batches; the Generator deployment owns one per replica."""

    def generate(self, requests: list[GenerateRequest], stop: StopCheck) -> list[str]:
        """One answer per request; every request in the list has the same `batch_key()`.

        `stop` is to be asked between decoding steps: when it says True, nobody waits for these
        answers any more, and the engine raises `GenerationStopped` to free the replica.
        Raises ValueError when the input cannot be decoded as asked (the request's fault: a
        client error); any other exception means the engine is broken (the replica restarts).
        """
        ...


EngineFactory = Callable[[str, "Precision"], Engine]
"""Builds an engine from the generator's name or path and its precision (`RagEngine` is one)."""


class RagEngine:
    """The default engine: a Hugging Face generator decoded by RAG-Sequence or RAG-Token."""

    def __init__(self, generator: str, precision: Precision = "auto"):
        from services.rag.generator import make_generator
        from services.rag.loading import load_generator

        model, tokenizer = load_generator(generator, precision=precision)
        self.generator = make_generator(model, tokenizer).eval()

    def generate(self, requests: list[GenerateRequest], stop: StopCheck) -> list[str]:
        from services.rag.model import generate_answers

        first = requests[0]
        return generate_answers(
            self.generator,
            [r.question for r in requests],
            [r.titles for r in requests],
            [r.texts for r in requests],
            [r.doc_scores for r in requests],
            mode=first.mode,
            decoding=first.decoding,
            num_beams=first.num_beams,
            max_new_tokens=first.max_new_tokens,
            stop=stop,
        )
