"""Stand-ins for the Ingress's deployments: a fake retriever and engines behind the real batch logic."""

from __future__ import annotations

import asyncio
import inspect
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
from fastapi import FastAPI

from cluster.shard_group import ShardUnavailableError
from services.rag.config import ModelsConfig
from services.rag.retrieval import Retrieved
from services.rag.stopping import GenerationStopped, StopCheck
from services.serving.app import Ingress, build_api
from services.serving.config import GeneratorConfig, LimitsConfig
from services.serving.engine import Emit, GenerateRequest
from services.serving.generator_deployment import GeneratorDeployment

TOKEN = "test-admin-token"
PASSAGES = [
    (10, "France", "Paris is the capital of France."),
    (11, "Peru", "Lima is the capital of Peru."),
    (12, "Norway", "Oslo is the capital of Norway and its largest city."),
    (13, "Egypt", "Cairo lies on the Nile, the capital of Egypt."),
    (14, "Falcons", "The peregrine falcon is the fastest bird."),
]


class FakeRetriever:
    """Scores a passage by the question words in it; ties go to the lower id."""

    def __init__(self) -> None:
        self.version, self.down = "v0001", False

    def retrieve(self, question: str, k: int, retriever: str | None = None) -> Retrieved:
        if self.down:
            raise ShardUnavailableError("no live replica for shards [0, 1]")
        words = set(question.lower().split())
        scored = sorted(
            (
                (sum(w.strip(".,") in words for w in text.lower().split()), pid, title, text)
                for pid, title, text in PASSAGES
            ),
            key=lambda s: (-s[0], s[1]),
        )[:k]
        scores = np.array([[s[0] for s in scored]], dtype=np.float32)  # (1, k)
        return Retrieved(
            ids=np.array([[s[1] for s in scored]]),
            titles=[[s[2] for s in scored]],
            texts=[[s[3] for s in scored]],
            scores=scores,
            doc_scores=2 * scores,
            vectors=None,
            version=self.version,
            coverage=1.0,
            retrieve_ms=1.5,
            retriever=retriever or "dense",
            found_by=np.full(scores.shape, retriever or "dense"),
            part_scores={retriever or "dense": scores},
        )

    def health(self) -> dict[str, Any]:
        return {"ok": not self.down, "index_version": self.version}

    def index_info(self) -> dict[str, Any]:
        return {"version": self.version, "versions": ["v0001", "v0002"]}

    def swap(self, version: str) -> str:
        self.version = version
        return version


class FakeEngine:
    """Answers with the first word of the best-scored passage; refuses questions about 'nothing'."""

    def __init__(self, generator: str, precision: str = "auto") -> None:
        self.batches: list[list[str]] = []

    def generate(self, requests: list[GenerateRequest], stop: StopCheck) -> list[str]:
        self.batches.append([r.question for r in requests])
        if any("nothing" in r.question for r in requests):
            raise ValueError("the prompt is longer than the generator's context")
        return [r.texts[int(np.argmax(r.doc_scores))].split()[0] for r in requests]

    def stream(self, request: GenerateRequest, stop: StopCheck, emit: Emit) -> str:
        """The answer in two pieces."""
        [answer] = self.generate([request], stop)
        for piece in (answer[:2], answer[2:]):
            emit(piece)
        return answer


class BrokenEngine(FakeEngine):
    def generate(self, requests: list[GenerateRequest], stop: StopCheck) -> list[str]:
        raise RuntimeError("CUDA error: device-side assert triggered")


class InProcessGenerator:
    """The Generator deployment's batch logic, one request per batch (`@serve.batch` needs Serve)."""

    def __init__(self, engine: type[FakeEngine] | type[SlowEngine]) -> None:
        self.deployment = GeneratorDeployment.func_or_class(
            GeneratorConfig(), ModelsConfig(generator="fake"), engine=engine
        )

    def generate(self, request: GenerateRequest):
        return self.deployment.admit(request) or self.deployment.generate_batch([request])[0]

    def stream(self, request: GenerateRequest):
        return self.deployment.stream(request)


class LocalStream:
    """DeploymentResponseGenerator stand-in over an async generator."""

    def __init__(self, pieces: Any) -> None:
        self.pieces = pieces

    def __anext__(self) -> Any:
        return self.pieces.__anext__()

    def cancel(self) -> None:
        asyncio.ensure_future(self.pieces.aclose())


class LocalHandle:
    """DeploymentHandle stand-in: `handle.method.remote(*args)` awaits `target.method(*args)`."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def options(self, **_: Any) -> LocalHandle:
        return self

    def __getattr__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(remote=lambda *args: _remote(getattr(self.target, name), *args))

    def broadcast(self, name: str, *args: Any) -> SimpleNamespace:
        async def results() -> list[Any]:
            return [await _call(getattr(self.target, name), *args)]

        return SimpleNamespace(results_async=results)


def _remote(method: Any, *args: Any) -> Any:
    """A stream for a method that returns an async generator, else an awaitable of its result."""
    result = method(*args)
    return LocalStream(result) if inspect.isasyncgen(result) else _result(result)


async def _result(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def _call(method: Any, *args: Any) -> Any:
    return await _result(method(*args))


def fake_backend() -> SimpleNamespace:
    """A fake retriever and the Generator's batch logic over FakeEngine."""
    return SimpleNamespace(retriever=FakeRetriever(), generator=InProcessGenerator(FakeEngine))


def api_over(
    backend: SimpleNamespace, token: str | None = TOKEN, limits: LimitsConfig | None = None
) -> FastAPI:
    """The real FastAPI app over `backend`'s stand-ins."""
    generator, retriever = LocalHandle(backend.generator), LocalHandle(backend.retriever)
    ingress = Ingress(retriever, generator, limits or LimitsConfig(), token)
    return build_api(ingress)


class SlowEngine:
    """Takes one 5 ms step per 4 units of work (n_docs × num_beams × max_new_tokens, summed over
    the batch), asking `stop` before each; answers with the best-scored passage's first word.
    A stream sends that word's first letter before its steps; `stopped` is set when one stops."""

    STEP_S = 0.005

    def __init__(self, generator: str, precision: str = "auto") -> None:
        self.pause = threading.Event()  # never set: a step is a bounded wait
        self.stopped = threading.Event()

    def stream(self, request: GenerateRequest, stop: StopCheck, emit: Emit) -> str:
        answer = request.texts[int(np.argmax(request.doc_scores))].split()[0]
        emit(answer[:1])
        self.generate([request], stop)
        emit(answer[1:])
        return answer

    def generate(self, requests: list[GenerateRequest], stop: StopCheck) -> list[str]:
        work = sum(r.work() for r in requests)
        for step in range(work // 4):
            if stop():
                self.stopped.set()
                raise GenerationStopped(f"generation stopped after {step} of {work // 4} steps")
            self.pause.wait(self.STEP_S)
        return [r.texts[int(np.argmax(r.doc_scores))].split()[0] for r in requests]
