"""The Ingress in process, without Serve: a fake engine and a fake retriever behind the real routes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from services.rag.config import DecodingConfig, ModelsConfig
from services.rag.stopping import GenerationStopped, StopCheck
from services.serving import app as app_module
from services.serving.api import MAX_BODY_BYTES
from services.serving.config import GeneratorConfig, LimitsConfig
from services.serving.engine import GenerateRequest
from services.serving.generator_deployment import GeneratorDeployment, Ticket
from tests.services.serving.fakes import TOKEN, BrokenEngine, FakeEngine, InProcessGenerator, api_over


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max())
    return e / e.sum()


def test_answer_carries_the_retrieved_docs_and_their_probabilities(client, backend):
    response = client.post("/v1/answer", json={"question": "capital of Peru", "n_docs": 3, "mode": "token"})
    assert response.status_code == 200, response.text
    body = response.json()
    found = backend.retriever.retrieve("capital of Peru", 3)
    assert body["answer"] == "Lima" and body["mode"] == "token"
    assert [d["id"] for d in body["docs"]] == found.ids[0].tolist() == [11, 10, 12]
    assert [(d["title"], d["text"], d["score"]) for d in body["docs"]] == list(
        zip(found.titles[0], found.texts[0], found.doc_scores[0].tolist())
    )
    np.testing.assert_allclose([d["prob"] for d in body["docs"]], _softmax(found.doc_scores[0]), rtol=1e-6)
    assert (body["index_version"], body["index_coverage"]) == ("v0001", 1.0)
    assert body["timings_ms"]["retrieve"] == 1.5
    assert body["timings_ms"]["total"] >= body["timings_ms"]["generate"] >= 0


def test_retrieve_one_question_or_several(client, backend):
    many = client.post(
        "/v1/retrieve", json={"questions": ["capital of Norway", "fastest bird"], "k": 2}
    ).json()
    assert [[d["id"] for d in docs] for docs in many["results"]] == [[12, 10], [14, 10]]
    one = client.post("/v1/retrieve", json={"question": "fastest bird", "k": 2}).json()
    assert one["results"] == many["results"][1:] and one["index_version"] == "v0001"


def test_the_retriever_asked_for_reaches_the_retriever_and_names_each_doc(client):
    body = client.post("/v1/retrieve", json={"question": "fastest bird", "k": 2, "retriever": "bm25"}).json()
    assert [(d["retriever"], d["bm25_score"], d["dense_score"]) for d in body["results"][0]] == [
        ("bm25", 2.0, None),
        ("bm25", 0.0, None),
    ]
    answer = client.post("/v1/answer", json={"question": "capital of Peru", "n_docs": 2}).json()
    assert {d["retriever"] for d in answer["docs"]} == {"dense"} and answer["docs"][0]["fused_score"] is None
    bad = client.post("/v1/retrieve", json={"question": "q", "retriever": "sparse"})
    assert bad.status_code == 422 and "retriever" in bad.text


def test_chat_cites_the_doc_holding_the_answer_plain_and_streamed(client):
    request = {
        "model": "m",
        "temperature": 0.3,
        "n_docs": 3,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "ignored"},
            {"role": "user", "content": [{"type": "text", "text": "Nile Egypt"}]},
        ],
    }
    plain = client.post("/v1/chat/completions", json=request).json()
    assert plain["object"] == "chat.completion" and plain["model"] == "m"
    assert plain["choices"][0]["message"]["content"] == "Cairo [1]"
    assert plain["citations"] == [1] and plain["docs"][0]["id"] == 13
    streamed = client.post("/v1/chat/completions", json={**request, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [e for e in streamed.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Cairo [1]"
    assert chunks[-1]["docs"] == plain["docs"] and chunks[-1]["citations"] == [1]


JSON = {"content-type": "application/json"}
BAD_INPUT = [
    ("/v1/answer", b"{not json", JSON, 400, "not valid JSON: Expecting property name", None),
    ("/v1/answer", b'{"question": "caf\xe9"}', JSON, 400, "not valid UTF-8 (byte 17)", None),
    ("/v1/answer", b"", JSON, 400, "body is empty", None),
    ("/v1/answer", b'["question"]', JSON, 400, "must be a JSON object, got array", None),
    ("/v1/answer", b"null", JSON, 400, "must be a JSON object, got null", None),
    ("/v1/answer", b'{"question": "q"}', {"content-type": "text/plain"}, 415, "application/json", None),
    ("/v1/answer", b'{"question": "q"}', {}, 415, "application/json", None),
    ("/v1/answer", b"{}", JSON, 422, "question: Field required", "question"),
    ("/v1/answer", b'{"question": "   "}', JSON, 422, "question: question must not be empty", "question"),
    ("/v1/answer", b'{"question": "\\ud800 x"}', JSON, 422, "lone surrogate", "question"),
    ("/v1/answer", json.dumps({"question": "x" * 2001}).encode(), JSON, 422, "limit is 2000", "question"),
    ("/v1/answer", b'{"question": "q", "n_docs": 0}', JSON, 422, "n_docs: ", "n_docs"),
    ("/v1/answer", b'{"question": "q", "n_docs": 51}', JSON, 422, "n_docs: ", "n_docs"),
    ("/v1/answer", b'{"question": "q", "n_docs": "five"}', JSON, 422, "n_docs: ", "n_docs"),
    ("/v1/answer", b'{"question": "q", "mode": "beam"}', JSON, 422, "mode: ", "mode"),
    ("/v1/answer", b'{"question": "q", "decoding": "greedy"}', JSON, 422, "decoding: ", "decoding"),
    ("/v1/answer", b'{"question": "q", "num_beams": 9}', JSON, 422, "num_beams: ", "num_beams"),
    ("/v1/answer", b'{"question": "q", "typo": 1}', JSON, 422, "typo: Extra inputs", "typo"),
    ("/v1/answer", b'{"question": "", "n_docs": 0}', JSON, 422, "(and 1 more)", "n_docs"),
    ("/v1/retrieve", b'{"k": 3}', JSON, 422, "exactly one of 'question' or 'questions'", None),
    ("/v1/retrieve", b'{"question": "a", "questions": ["b"]}', JSON, 422, "exactly one", None),
    (
        "/v1/retrieve",
        b'{"questions": ["a", " "]}',
        JSON,
        422,
        "questions.1: question must not",
        "questions.1",
    ),
    ("/v1/retrieve", b'{"question": "q", "k": 99}', JSON, 422, "k: ", "k"),
    ("/v1/chat/completions", b'{"messages": []}', JSON, 422, "messages: ", "messages"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "system", "content": "hi"}]}',
        JSON,
        422,
        "messages: no message with role 'user'",
        "messages",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "q"}], "n": 2}',
        JSON,
        422,
        "n: ",
        "n",
    ),
    (
        "/v1/answer",
        json.dumps({"question": "q", "pad": "x" * MAX_BODY_BYTES}).encode(),
        JSON,
        413,
        f"bytes; the limit is {MAX_BODY_BYTES}",
        None,
    ),
    ("/v1/nowhere", b"{}", JSON, 404, "Not Found", None),
]


@pytest.mark.parametrize("path,body,headers,status,needle,param", BAD_INPUT)
def test_bad_input_gets_its_status_and_an_openai_error_naming_it(
    client, path, body, headers, status, needle, param
):
    response = client.post(path, content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"]
    assert error == {
        "message": error["message"],
        "type": "invalid_request_error",
        "param": param,
        "code": status,
    }


def test_a_body_over_the_limit_is_refused_before_it_is_all_read(backend):
    """Streamed without a Content-Length, the body is cut off once it passes the limit: the app
    reads at most one chunk past it."""
    chunk, sent = b"x" * 8192, []

    async def body() -> AsyncIterator[bytes]:
        yield b'{"question": "'
        for _ in range(1000):  # 8 MB
            sent.append(len(chunk))
            yield chunk

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=api_over(backend))
        async with httpx.AsyncClient(transport=transport, base_url="http://rayrag") as client:
            return await client.post("/v1/answer", content=body(), headers=JSON)

    response = asyncio.run(post())
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
    assert sum(sent) <= MAX_BODY_BYTES + len(chunk)


def test_a_question_the_engine_refuses_is_a_422_and_others_still_answer(client, backend):
    refused = client.post("/v1/answer", json={"question": "nothing at all"})
    assert refused.status_code == 422
    assert "cannot be answered as asked: the prompt is longer" in refused.json()["error"]["message"]
    assert client.post("/v1/answer", json={"question": "fastest bird"}).json()["answer"] == "The"
    backend.generator.deployment.check_health()  # a refused input is not a broken engine


def test_a_batch_decodes_per_setting_and_isolates_the_refused_request():
    generator = GeneratorDeployment.func_or_class(
        GeneratorConfig(), ModelsConfig(generator="fake"), engine=FakeEngine
    )

    def request(question: str, mode: str) -> GenerateRequest:
        return GenerateRequest(
            question=question,
            titles=["t"],
            texts=[f"{question} text"],
            doc_scores=[1.0],
            options=DecodingConfig(mode=mode, num_beams=1, max_new_tokens=4),
        )

    out = generator.generate_batch(
        [
            request("a", "sequence"),
            request("b", "token"),
            request("nothing", "sequence"),
            request("c", "token"),
        ]
    )
    assert [(g.answer, g.error is None) for g in out] == [("a", True), ("b", True), ("", False), ("c", True)]
    assert "longer than the generator's context" in out[2].error
    assert generator.engine.batches == [["a", "nothing"], ["a"], ["nothing"], ["b", "c"]]


def test_a_broken_engine_fails_the_health_check(backend):
    broken = InProcessGenerator(BrokenEngine)
    with pytest.raises(RuntimeError, match="device-side assert"):
        broken.deployment.generate_batch(
            [GenerateRequest("q", ["t"], ["x"], [1.0], DecodingConfig(num_beams=1, max_new_tokens=4))]
        )
    with pytest.raises(RuntimeError, match="device-side assert"):
        broken.deployment.check_health()


def test_no_live_shard_is_a_503_naming_them(client, backend):
    backend.retriever.down = True
    for path, body in (("/v1/answer", {"question": "q"}), ("/v1/retrieve", {"question": "q"})):
        response = client.post(path, json=body)
        assert response.status_code == 503
        assert response.json()["error"] == {
            "message": "the index cannot be searched right now: no live replica for shards [0, 1]",
            "type": "server_error",
            "param": None,
            "code": 503,
        }
    assert client.get("/healthz").status_code == 503


def test_admin_swap_needs_the_token(client, backend):
    def swap(version: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return client.post("/v1/admin/index/swap", json={"version": version}, headers=headers)

    assert swap("v0002").status_code == 401
    assert swap("../x").status_code == 401  # the token is checked before the body
    assert swap("v0002", {"authorization": "Basic abc"}).status_code == 401
    assert swap("v0002", {"authorization": "Bearer nope"}).status_code == 403
    unknown = swap("v0009", {"authorization": f"Bearer {TOKEN}"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "version"
    assert swap("../x", {"authorization": f"Bearer {TOKEN}"}).status_code == 422
    assert backend.retriever.version == "v0001"
    done = swap("v0002", {"authorization": f"Bearer {TOKEN}"})
    assert done.json() == {"version": "v0002", "replicas": 1, "previous": "v0001"}
    assert client.get("/v1/index").json()["version"] == "v0002"


def test_admin_calls_are_off_without_a_token(backend, monkeypatch):
    monkeypatch.delenv("RAYRAG_ADMIN_TOKEN", raising=False)
    with TestClient(api_over(backend, token=None)) as client:
        response = client.post(
            "/v1/admin/index/swap", json={"version": "v0002"}, headers={"authorization": "Bearer anything"}
        )
    assert response.status_code == 403 and "disabled" in response.json()["error"]["message"]


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


ROUTES = {  # (method, path): (request model, statuses the route can answer with)
    ("post", "/v1/answer"): ("AnswerRequest", {200, 400, 413, 415, 422, 503, 504}),
    ("post", "/v1/retrieve"): ("RetrieveRequest", {200, 400, 413, 415, 422, 503}),
    ("post", "/v1/chat/completions"): ("ChatRequest", {200, 400, 413, 415, 422, 503, 504}),
    ("post", "/v1/admin/index/swap"): ("SwapRequest", {200, 400, 401, 403, 404, 413, 415, 422}),
    ("get", "/healthz"): (None, {200, 503}),
    ("get", "/v1/index"): (None, {200}),
}


def test_openapi_document_resolves_and_documents_bodies_and_statuses(client):
    document = client.get("/openapi.json").json()
    refs = _refs(document)
    assert "#/components/schemas/ChatMessage" in refs
    for ref in refs:
        _resolve(document, ref)
    operations = {(m, p): op for p, ops in document["paths"].items() for m, op in ops.items()}
    assert set(operations) == set(ROUTES)
    for key, (model, statuses) in ROUTES.items():
        operation = operations[key]
        assert {int(s) for s in operation["responses"]} == statuses, key
        errors = statuses - {200} - ({503} if key[1] == "/healthz" else set())  # health: a report
        for status in errors:
            schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (key, status)
        if model is not None:
            body = operation["requestBody"]
            assert body["required"] is True
            assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
    assert operations[("post", "/v1/admin/index/swap")]["security"] == [{"HTTPBearer": []}]


def test_a_request_over_the_work_limit_is_a_422_naming_it(backend):
    with TestClient(api_over(backend, limits=LimitsConfig(max_request_work=640))) as client:
        within = client.post("/v1/answer", json={"question": "fastest bird", "n_docs": 5, "num_beams": 4})
        over = client.post(
            "/v1/answer", json={"question": "fastest bird", "n_docs": 5, "num_beams": 4, "max_new_tokens": 33}
        )
        chat = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "q"}], "n_docs": 50, "max_tokens": 256},
        )
    assert within.status_code == 200
    assert over.status_code == 422 and chat.status_code == 422
    assert "5 × 4 × 33 = 660 is over this server's limit of 640" in over.json()["error"]["message"]
    assert "args.limits.max_request_work" in chat.json()["error"]["message"]
    assert len(backend.generator.deployment.engine.batches) == 1  # refused before any decoding


class FullQueue:
    """A deployment whose queue is full: every call is refused by Serve's backpressure."""

    async def generate(self, *_: Any) -> None:
        raise BackPressureError(num_queued_requests=64, max_queued_requests=64)

    retrieve = generate


@pytest.mark.parametrize("full", ["retriever", "generator"])
def test_full_queues_are_a_503_with_retry_after(backend, full):
    setattr(backend, full, FullQueue())
    with TestClient(api_over(backend, limits=LimitsConfig(retry_after_s=3))) as client:
        response = client.post("/v1/answer", json={"question": "fastest bird"})
    assert response.status_code == 503 and response.headers["retry-after"] == "3"
    message = response.json()["error"]["message"]
    assert f"the {full.capitalize()} is at capacity" in message and "max_queued_requests=64" in message


class NeverAnswers:
    """A Generator that holds every request until it is cancelled, and records the cancellation."""

    def __init__(self) -> None:
        self.requests: list[GenerateRequest] = []
        self.cancelled = 0

    async def generate(self, request: GenerateRequest) -> None:
        self.requests.append(request)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def test_past_the_deadline_a_504_and_the_generation_is_cancelled(backend):
    backend.generator = NeverAnswers()
    with TestClient(api_over(backend, limits=LimitsConfig(request_timeout_s=0.2))) as client:
        before = time.time()
        response = client.post("/v1/answer", json={"question": "fastest bird"})
    assert response.status_code == 504
    assert "no answer within the deadline of 0.2 s" in response.json()["error"]["message"]
    assert backend.generator.cancelled == 1
    assert before < backend.generator.requests[0].deadline <= time.time() + 0.2  # the replica knows it too


def _request(question: str = "q", deadline: float | None = None) -> GenerateRequest:
    return GenerateRequest(
        question, ["t"], ["x"], [1.0], DecodingConfig(num_beams=1, max_new_tokens=4), deadline=deadline
    )


def test_void_requests_are_not_decoded():
    generator = GeneratorDeployment.func_or_class(
        GeneratorConfig(), ModelsConfig(generator="fake"), engine=FakeEngine
    )
    cancelled = Ticket()
    cancelled.cancelled = True
    requests = [_request("a"), _request("b", deadline=time.time() - 1), _request("c")]
    out = generator.generate_batch(requests, [Ticket(), Ticket(0.0), cancelled])
    assert [(g.answer, g.stopped) for g in out] == [("x", False), ("", True), ("", True)]
    assert generator.engine.batches == [["a"]]


class DecodesUntilStopped(FakeEngine):
    """Takes decoding steps until `stop` says so; `started` is set at the first step."""

    def __init__(self, generator: str, precision: str = "auto") -> None:
        super().__init__(generator, precision)
        self.started, self.steps = threading.Event(), 0

    def generate(self, requests: list[GenerateRequest], stop: StopCheck) -> list[str]:
        self.started.set()
        while not stop():
            self.steps += 1
            assert self.steps < 10**8, "never stopped"
        raise GenerationStopped(f"generation stopped after {self.steps} steps")


def test_a_batch_stops_decoding_once_every_request_in_it_is_void():
    generator = GeneratorDeployment.func_or_class(
        GeneratorConfig(), ModelsConfig(generator="x"), engine=DecodesUntilStopped
    )
    tickets = [Ticket(), Ticket()]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        batch = pool.submit(generator.generate_batch, [_request("a"), _request("b")], tickets)
        assert generator.engine.started.wait(30)
        tickets[0].cancelled = True
        assert generator.load() == {"held": 0, "working": 2, "stopped": 0}  # one caller still waits
        tickets[1].cancelled = True
        out = batch.result(timeout=30)
    assert all(g.stopped and "generation stopped after" in g.error for g in out)
    assert generator.load() == {"held": 0, "working": 0, "stopped": 1}


def test_every_request_is_counted_by_route_and_status(client, monkeypatch):
    counted: list[dict[str, str]] = []
    monkeypatch.setattr(app_module.REQUESTS, "inc", lambda value=1.0, tags=None: counted.append(tags))
    client.post("/v1/answer", json={"question": "fastest bird"})
    client.post("/v1/answer", json={"question": ""})
    client.get("/nowhere/42")
    assert counted == [
        {"route": "/v1/answer", "status": "200"},
        {"route": "/v1/answer", "status": "422"},
        {"route": "other", "status": "404"},
    ]


class CountsThreads(FakeEngine):
    """Records the torch threads each engine call runs with."""

    def __init__(self, generator: str, precision: str = "auto") -> None:
        super().__init__(generator, precision)
        self.threads: list[int] = []

    def generate(self, requests: list[GenerateRequest], stop: StopCheck) -> list[str]:
        self.threads.append(torch.get_num_threads())
        return super().generate(requests, stop)


def test_a_lone_batch_uses_every_thread_and_a_busy_replica_its_share():
    config = GeneratorConfig(torch_threads=1, torch_threads_alone=3)
    generator = GeneratorDeployment.func_or_class(
        config, ModelsConfig(generator="fake"), engine=CountsThreads
    )
    request = GenerateRequest("q", ["t"], ["text"], [1.0], DecodingConfig(num_beams=1, max_new_tokens=4))
    saved = torch.get_num_threads()
    try:
        generator.held = 1  # this request alone
        generator.generate_batch([request])
        generator.held = 2  # another request waits behind it
        generator.generate_batch([request])
    finally:
        torch.set_num_threads(saved)
    assert generator.engine.threads == [3, 1]
