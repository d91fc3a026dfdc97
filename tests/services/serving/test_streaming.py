"""Streamed chat answers in process (fake engines behind the real Generator and Ingress logic):
the default decoding of streams, the client leaving mid-stream, and admission by deadline."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx

from services.rag.config import DecodingConfig
from services.serving.api import STREAM_DEFAULTS, ChatRequest
from services.serving.app import Ingress
from services.serving.config import LimitsConfig
from services.serving.engine import GenerateRequest
from tests.services.serving.fakes import FakeRetriever, InProcessGenerator, LocalHandle, SlowEngine, api_over

QUESTION = "fastest bird"  # FakeRetriever ranks "The peregrine falcon..." first


def _chat(**fields) -> ChatRequest:
    return ChatRequest.model_validate({"messages": [{"role": "user", "content": QUESTION}], **fields})


def _slow_backend() -> SimpleNamespace:
    return SimpleNamespace(retriever=FakeRetriever(), generator=InProcessGenerator(SlowEngine))


def test_streams_decode_greedy_rag_token_unless_a_decoding_field_is_given():
    assert _chat(stream=True).options().model_dump(include=set(STREAM_DEFAULTS)) == STREAM_DEFAULTS
    given = _chat(stream=True, num_beams=3).options()
    assert (given.mode, given.num_beams) == ("sequence", 3)
    assert _chat().options().model_dump(include=set(STREAM_DEFAULTS)) == {
        "mode": "sequence",
        "decoding": "fast",
        "num_beams": 4,
    }


def test_streamed_pieces_equal_the_plain_answer_and_docs_come_last(client):
    request = {"messages": [{"role": "user", "content": "Nile Egypt"}], "n_docs": 3, **STREAM_DEFAULTS}
    plain = client.post("/v1/chat/completions", json=request).json()
    events = [
        e for e in client.post("/v1/chat/completions", json={**request, "stream": True}).text.split("\n\n")
    ]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e and e != "data: [DONE]"]
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert deltas == ["", "Ca", "iro", " [1]", ""]  # role, the engine's pieces, the mark, stop
    assert "".join(deltas) == plain["choices"][0]["message"]["content"]
    assert [("docs" in c) for c in chunks] == [False] * 4 + [True]
    assert chunks[-1]["docs"] == plain["docs"] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_client_leaving_mid_stream_stops_the_decoding_at_its_next_step():
    backend = _slow_backend()
    ingress = Ingress(LocalHandle(backend.retriever), LocalHandle(backend.generator), LimitsConfig())
    request = _chat(stream=True, max_tokens=256)  # 5 × 1 × 256 units: 320 steps of 5 ms

    async def leave() -> list[str]:
        opened = await ingress.open_stream(QUESTION, request.options(), "/v1/chat/completions")
        events = ingress.chat_events(request, opened)
        seen = [await anext(events), await anext(events)]  # role, first piece
        await events.aclose()  # what Starlette does when the client disconnects
        engine = backend.generator.deployment.engine
        assert await asyncio.to_thread(engine.stopped.wait, 60)
        while backend.generator.deployment.held:  # the decoding thread has returned
            await asyncio.sleep(0.01)
        return seen

    seen = asyncio.run(leave())
    assert json.loads(seen[1].removeprefix("data: "))["choices"][0]["delta"]["content"] == "T"


def test_a_request_that_cannot_finish_behind_the_queued_work_is_refused_at_once():
    """The Generator measures its seconds per unit of work; with a 1.6 s stream ahead (SlowEngine
    waits ≥ 5 ms per 4 units), a request with a 1 s deadline is refused with the wait estimated,
    and never reaches the engine; with 60 s it is answered."""
    backend = _slow_backend()
    generator = backend.generator.deployment
    generator.generate_batch(
        [GenerateRequest("q", ["t"], ["x"], [1.0], DecodingConfig(num_beams=1, max_new_tokens=4))]
    )
    ahead = GenerateRequest(
        "q", ["t"] * 5, ["x"] * 5, [1.0] * 5, DecodingConfig(mode="token", num_beams=1, max_new_tokens=256)
    )

    async def ask(timeout_s: float) -> httpx.Response:
        api = api_over(backend, limits=LimitsConfig(request_timeout_s=timeout_s))
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=60) as client:
            return await client.post("/v1/answer", json={"question": QUESTION})

    async def scenario() -> tuple[httpx.Response, int, httpx.Response]:
        stream = generator.stream(ahead)
        assert await anext(stream) == "x"  # admitted, decoding
        refused = await ask(1.0)
        held = generator.held
        answered = await ask(60.0)
        await stream.aclose()
        return refused, held, answered

    refused, held, answered = asyncio.run(scenario())
    assert refused.status_code == 503 and held == 1
    assert int(refused.headers["retry-after"]) >= 2  # ≥ 1280 units × 5 ms / 4
    assert "the work queued ahead takes about" in refused.json()["error"]["message"]
    assert answered.status_code == 200 and answered.json()["answer"] == "The"
