"""The generator engine the Generator deployment runs: its interface, request and result, the RAG one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from services.rag.config import DecodingConfig
from services.rag.stopping import StopCheck

if TYPE_CHECKING:
    import torch

    from services.rag.precision import Precision

Emit = Callable[[str], None]
"""Receives the next piece of a streamed answer; the pieces joined are the answer."""


@dataclass
class GenerateRequest:
    """One question with its K retrieved passages and their doc scores, and how to decode."""

    question: str
    titles: list[str]
    texts: list[str]
    doc_scores: list[float]  # (K,)
    options: DecodingConfig  # its n_docs aside: the K passages given are decoded
    deadline: float | None = None  # time.time() past which nobody waits for the answer

    def work(self) -> int:
        """Decoder rows × steps at most: n_docs × num_beams × max_new_tokens."""
        return len(self.titles) * self.options.num_beams * self.options.max_new_tokens

    def batch_key(self) -> tuple:
        """Requests with equal keys go to the engine together, in one `generate` call."""
        options = self.options
        return (options.mode, options.decoding, options.num_beams, options.max_new_tokens, len(self.titles))


@dataclass
class Generated:
    """An answer, or `error` naming why this request's input cannot be decoded (→ 422), or why
    its decoding was stopped (`stopped`: its caller left or its deadline passed), or why it was
    refused (`wait_s`: it could not finish by its deadline behind the work queued ahead, which
    takes about `wait_s` seconds)."""

    answer: str
    generate_ms: float
    batch_size: int
    error: str | None = None
    stopped: bool = False
    wait_s: float | None = None


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

    def stream(self, request: GenerateRequest, stop: StopCheck, emit: Emit) -> str:
        """The answer of `generate([request])`, also given to `emit` piece by piece, each as soon
        as no later step can change it; `stop` and the exceptions as for `generate`."""
        ...


EngineFactory = Callable[[str, "Precision"], Engine]
"""Builds an engine from the generator's name or path and its precision (`RagEngine` is one)."""


class RagEngine:
    """The default engine: a Hugging Face generator decoded by RAG-Sequence or RAG-Token."""

    def __init__(self, generator: str, precision: Precision = "auto"):
        from services.rag.loading import load_generator_for_inference

        self.generator = load_generator_for_inference(generator, precision)

    def generate(
        self,
        requests: list[GenerateRequest],
        stop: StopCheck,
        on_prefix: Callable[[torch.Tensor], None] | None = None,
    ) -> list[str]:
        from services.rag.model import generate_answers

        first = requests[0]
        return generate_answers(
            self.generator,
            [r.question for r in requests],
            [r.titles for r in requests],
            [r.texts for r in requests],
            [r.doc_scores for r in requests],
            first.options,
            stop=stop,
            on_prefix=on_prefix,
        )

    def stream(self, request: GenerateRequest, stop: StopCheck, emit: Emit) -> str:
        text = TextStream(lambda tokens: self.generator.decode(tokens[None])[0], emit)
        [answer] = self.generate([request], stop, text.update)
        text.finish(answer)
        return answer


class TextStream:
    """Turns a growing prefix of final tokens into the pieces of text that no later token changes:
    a prefix's text without its trailing spaces or partial characters."""

    def __init__(self, decode: Callable[[torch.Tensor], str], emit: Emit) -> None:
        self.decode = decode
        self.emit = emit
        self.sent = ""

    def update(self, tokens: torch.Tensor) -> None:
        """tokens (t,): the final prefix so far."""
        self._send(self.decode(tokens).rstrip().rstrip("\ufffd"))

    def finish(self, answer: str) -> None:
        self._send(answer)

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit(text[len(self.sent) :])
            self.sent = text
