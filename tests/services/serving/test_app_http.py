"""The Serve app over real HTTP on 127.0.0.1: endpoints, OpenAI client, provenance, bad input, swap."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from cluster.passages import Passage

pytestmark = pytest.mark.slow  # see pyproject.toml: `pytest -m "not slow"` skips it

APP = "rayrag-test"
TOKEN = "test-admin-token"
COLORS = ["red", "green", "blue", "amber", "violet", "silver", "golden", "black"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Hanoi", "Dakar"]


def _corpus(words: list[str], prefix: str) -> list[Passage]:
    return [
        Passage(
            id=i,
            title=f"{prefix} {i}",
            text=f"The {COLORS[i % 8]} {word} was first seen in {CITIES[(i * 3) % 8]}.",
        )
        for i, word in enumerate(words)
    ]


CORPUS_V1 = _corpus([f"falcon{i}" for i in range(24)], "Bird")
CORPUS_V2 = _corpus([f"comet{i}" for i in range(24)], "Sky")


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    """Tiny encoder + tiny causal generator, a 2-shard index (v0001 published, v0002 not), served at
    serve_url."""
    from ray import serve

    from cluster.index_build import build_index
    from services.serving.app import build_app
    from tests.tiny_models import save_tiny_encoder, save_tiny_generator

    tmp = tmp_path_factory.mktemp("serve")
    encoder = save_tiny_encoder(tmp / "encoder")
    generator = save_tiny_generator(tmp / "generator")
    root = tmp / "index"
    # one encoder actor per build, not one per batch of 16: each is a process start-up
    build = {"encoder": encoder, "shards": 2, "num_encoders": 1, "show_progress": False}
    assert build_index(CORPUS_V1, root, **build) == "v0001"
    assert build_index(CORPUS_V2, root, publish=False, **build) == "v0002"
    args = {
        "index": {"root": str(root), "follow_s": 0.3},
        "models": {"query_encoder": encoder, "generator": generator, "precision": "float32"},  # as in process
        "retrieval": {"fusion": "rrf", "candidates": 50},  # hybrid requests fuse by RRF over the top-50
        "retriever": {"num_cpus": 0.5},
        "generator": {"num_cpus": 0.5},
        "admin_token": TOKEN,
    }
    serve.run(build_app(args), name=APP, route_prefix="/")
    with httpx.Client(base_url=serve_url, timeout=60) as client:
        yield {"client": client, "root": root, "encoder": encoder, "generator": generator, "url": serve_url}
    serve.delete(APP)


ADMIN = {"authorization": f"Bearer {TOKEN}"}


def _restore_v0001(client: httpx.Client, root) -> None:
    """v0001 published and served: what every test starts from and leaves behind."""
    from cluster.index_store import publish, published_version

    if published_version(root) != "v0001":
        publish(root, "v0001")
        assert _served_version(client, "v0001") == "v0001"  # the app follows the pointer
    if client.get("/v1/index").json()["version"] != "v0001":  # an admin swap moved it off the pointer
        swap = client.post("/v1/admin/index/swap", json={"version": "v0001"}, headers=ADMIN)
        assert swap.status_code == 200, swap.text


@pytest.fixture(autouse=True)
def serving_v0001(app):
    """Tests that publish or swap may run in any order: each test starts and ends on v0001."""
    _restore_v0001(app["client"], app["root"])
    yield
    _restore_v0001(app["client"], app["root"])


@pytest.fixture(scope="module")
def group(app):
    """A driver-side ShardGroup over v0001 of the served index: the reference for the served docs."""
    from cluster.shard_group import ShardGroup, ShardGroupConfig

    group = ShardGroup(ShardGroupConfig(index_root=str(app["root"])), version="v0001")
    yield group
    group.close()


@pytest.fixture(scope="module")
def in_process(app, group):
    """The served models and index in this process: RagModel over the driver-side ShardGroup (v0001)."""
    import torch

    from cluster.encoders import TextEncoder
    from services.rag.config import DecodingConfig
    from services.rag.generator import make_generator
    from services.rag.loading import load_generator
    from services.rag.model import RagModel

    model, tokenizer = load_generator(app["generator"])
    encoder = TextEncoder.from_pretrained(app["encoder"]).eval()
    rag = RagModel(encoder, make_generator(model, tokenizer).eval())

    def answer(question: str, n_docs: int, **decoding) -> dict:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the deployments run (torch_threads: 1)
        try:
            query = rag.query_encoder.encode([question])  # (1, d)
            found = group.search(query, n_docs, return_vectors=True)
            scores = rag.doc_scores(torch.from_numpy(query), torch.from_numpy(found.vectors))  # (1, K)
            text = rag.generate([question], found.titles, found.texts, scores, DecodingConfig(**decoding))[0]
        finally:
            torch.set_num_threads(threads)
        return {
            "answer": text,
            "ids": found.ids[0].tolist(),
            "titles": found.titles[0],
            "probs": torch.softmax(scores[0], dim=0).tolist(),
            "version": found.version,
        }

    return answer


def _answer(client: httpx.Client, question: str, **options) -> dict:
    response = client.post("/v1/answer", json={"question": question, **options})
    assert response.status_code == 200, response.text
    return response.json()


DECODINGS = [
    {"mode": "sequence", "decoding": "fast"},
    {"mode": "sequence", "decoding": "thorough"},
    {"mode": "token", "decoding": "fast"},
]


@pytest.mark.parametrize("decoding", DECODINGS, ids=lambda d: f"{d['mode']}-{d['decoding']}")
def test_answer_equals_rag_model_in_process(app, in_process, decoding):
    """/v1/answer gives the answer, docs and p(z|x) that RagModel gives in process for the same
    question, encoder, generator, index and decoding settings; with its provenance and timings."""
    question, beams = "the blue falcon3", {"num_beams": 2, "max_new_tokens": 6}
    body = _answer(app["client"], question, n_docs=4, **decoding, **beams)
    expected = in_process(question, 4, **decoding, **beams)
    # three different answers for the three decodings here, so a mix-up of settings shows
    assert len({in_process(question, 4, **other, **beams)["answer"] for other in DECODINGS}) == 3
    assert body["answer"] == expected["answer"] and body["mode"] == decoding["mode"]
    assert body["index_version"] == expected["version"] == "v0001"
    assert [d["id"] for d in body["docs"]] == expected["ids"] and len(expected["ids"]) == 4
    assert [d["title"] for d in body["docs"]] == expected["titles"]
    probs = np.array([d["prob"] for d in body["docs"]])
    np.testing.assert_allclose(probs, expected["probs"], rtol=0, atol=1e-5)
    assert abs(probs.sum() - 1) < 1e-5
    scores = np.array([d["score"] for d in body["docs"]])
    np.testing.assert_allclose(
        probs, np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum(), rtol=1e-5
    )
    timings = body["timings_ms"]
    assert timings["total"] >= timings["retrieve"] + timings["generate"] > 0


def test_provenance_matches_the_shard_group(app, group):
    """Docs of /v1/answer and /v1/retrieve are what one driver-side ShardGroup returns."""
    from cluster.encoders import TextEncoder
    from services.rag.model import default_doc_score_scale

    questions = ["Where was the blue falcon2 seen?", "golden falcon5 Perth"]
    encoder = TextEncoder.from_pretrained(app["encoder"])
    reference = group.search(encoder.encode(questions), k=5)
    retrieved = app["client"].post("/v1/retrieve", json={"questions": questions, "k": 5}).json()
    assert retrieved["index_version"] == "v0001"
    for b, question in enumerate(questions):
        answer = _answer(app["client"], question, n_docs=5, num_beams=1, max_new_tokens=2)
        for docs in (answer["docs"], retrieved["results"][b]):
            assert [d["id"] for d in docs] == reference.ids[b].tolist()
            assert [d["title"] for d in docs] == reference.titles[b]
            assert [d["text"] for d in docs] == reference.texts[b]
        scores = [[d["score"] for d in docs] for docs in (answer["docs"], retrieved["results"][b])]
        np.testing.assert_allclose(scores[0], scores[1], rtol=1e-6)  # one scoring for both
        np.testing.assert_allclose(
            scores[1], default_doc_score_scale(encoder) * reference.scores[b], rtol=1e-4, atol=1e-4
        )
        assert CORPUS_V1[reference.ids[b][0]].text == reference.texts[b][0]


def test_each_request_retrieves_with_the_retriever_it_asks_for(app, group):
    """BM25 and hybrid over HTTP: the docs of a driver-side ShardGroup's BM25 and fusion, with provenance."""
    from cluster.encoders import TextEncoder
    from cluster.fusion import RetrievalConfig
    from services.rag.model import default_doc_score_scale
    from services.rag.retrieval import group_search, retrieve

    questions = ["Where was the golden falcon5 seen?", "falcon11 Perth"]
    encoder = TextEncoder.from_pretrained(app["encoder"])
    expected = {
        name: retrieve(
            encoder, group_search(group), questions, 4, default_doc_score_scale(encoder), retrieval=config
        )
        for name in ("bm25", "hybrid")
        for config in [RetrievalConfig(retriever=name, fusion="rrf", candidates=50)]
    }
    for name, reference in expected.items():
        body = app["client"].post("/v1/retrieve", json={"questions": questions, "k": 4, "retriever": name})
        assert body.status_code == 200, body.text
        for b, docs in enumerate(body.json()["results"]):
            hits = reference.for_question(b, 4)
            assert [d["id"] for d in docs] == hits.ids[0].tolist() and docs
            assert [d["retriever"] for d in docs] == hits.found_by[0].tolist()
            np.testing.assert_allclose([d["score"] for d in docs], hits.doc_scores[0], rtol=1e-4, atol=1e-4)
    # hybrid: the 4 BM25 hits of "falcon11 Perth" (passages 7, 11, 15, 23) are also in the dense list
    # of all 24 passages, so their two RRF terms put them first
    docs = body.json()["results"][1]
    assert sorted(d["id"] for d in docs) == [7, 11, 15, 23]
    assert all(d["retriever"] == "dense+bm25" and d["bm25_score"] > 0 for d in docs)
    assert all(0 < d["fused_score"] < 1 for d in docs)  # rank fusion values, not similarities


def test_openai_client_plain_and_streaming(app):
    import openai

    client = openai.OpenAI(base_url=f"{app['url']}/v1", api_key="unused")
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Where was the green falcon1 seen?"},
    ]
    extra = {"n_docs": 3, "num_beams": 2}
    plain = client.chat.completions.create(model="rayrag", messages=messages, max_tokens=5, extra_body=extra)
    content = plain.choices[0].message.content
    docs = plain.model_extra["docs"]
    assert plain.choices[0].finish_reason == "stop" and len(docs) == 3
    marks = [int(m) for m in plain.model_extra["citations"]]
    assert marks and all(f"[{m}]" in content for m in marks) and max(marks) <= 3

    stream = client.chat.completions.create(
        model="rayrag", messages=messages, max_tokens=5, extra_body=extra, stream=True
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == content  # the same deterministic beam search answer
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert [d["id"] for d in chunks[-1].model_extra["docs"]] == [d["id"] for d in docs]


def _events(response: httpx.Response) -> list[dict]:
    lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    return [json.loads(line.removeprefix("data: ")) for line in lines]


def test_a_stream_equals_the_plain_answer_of_its_decoding(app):
    """A stream naming no decoding decodes greedy RAG-Token piece by piece through Serve; the
    pieces joined are the plain answer of the same request with that decoding."""
    from services.serving.api import STREAM_DEFAULTS

    request = {"messages": [{"role": "user", "content": "Where was the amber falcon3 seen?"}], "n_docs": 3}
    plain = app["client"].post("/v1/chat/completions", json={**request, **STREAM_DEFAULTS}).json()
    with app["client"].stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        chunks = _events(response)
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    assert len([p for p in pieces if p]) > 2  # the text came in pieces, then the marks
    assert chunks[-1]["docs"] == plain["docs"] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_client_leaving_mid_stream_stops_its_decoding(app):
    from ray import serve

    generator = serve.get_deployment_handle("Generator", APP)
    before = generator.load.remote().result()["stopped"]
    request = {"messages": [{"role": "user", "content": "Where was the red falcon0 seen?"}], "stream": True}
    with app["client"].stream(
        "POST", "/v1/chat/completions", json={**request, "max_tokens": 256}
    ) as response:
        for line in response.iter_lines():  # tiny random generators rarely end before 256 tokens
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
    deadline = time.time() + 60
    while generator.load.remote().result()["stopped"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert generator.load.remote().result()["stopped"] == before + 1


def test_health_and_index(app):
    health = app["client"].get("/healthz")
    index = app["client"].get("/v1/index").json()
    assert health.status_code == 200 and health.json()["index_version"] == index["version"] == "v0001"
    assert index["passages"] == 24 and index["shards"] == 2
    assert index["versions"] == ["v0001", "v0002"] and index["published"] == "v0001"
    replicas = [replica for row in health.json()["shards"] for replica in row]
    assert replicas and all(r["node_id"] and r["node_ip"] for r in replicas)  # each names its node


BAD_INPUT = [
    ("/v1/answer", b"{not json", 400, "not valid JSON"),
    ("/v1/answer", b'{"question": "caf\xe9"}', 400, "UTF-8"),
    ("/v1/answer", b"", 400, "empty"),
    ("/v1/answer", b'["question"]', 400, "JSON object"),
    ("/v1/answer", b"{}", 422, "question"),
    ("/v1/answer", b'{"question": "   "}', 422, "must not be empty"),
    ("/v1/answer", b'{"question": "\\ud800 x"}', 422, "lone surrogate"),
    ("/v1/answer", json.dumps({"question": "x" * 2001}).encode(), 422, "limit is 2000"),
    ("/v1/answer", b'{"question": "q", "n_docs": 0}', 422, "n_docs"),
    ("/v1/answer", b'{"question": "q", "n_docs": 51}', 422, "n_docs"),
    ("/v1/answer", b'{"question": "q", "mode": "beam"}', 422, "mode"),
    ("/v1/answer", b'{"question": "q", "decoding": "greedy"}', 422, "decoding"),
    ("/v1/answer", json.dumps({"question": "q", "pad": "x" * 70000}).encode(), 413, "limit"),
    ("/v1/retrieve", b'{"k": 3}', 422, "exactly one"),
    ("/v1/retrieve", b'{"question": "q", "k": 99}', 422, "k"),
    ("/v1/chat/completions", b'{"messages": []}', 422, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "system", "content": "hi"}]}', 422, "user"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD_INPUT)
def test_bad_input_gets_its_4xx(app, path, body, status, needle):
    response = app["client"].post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def test_oversized_chunked_body_is_refused(app):
    chunks = (b'{"question": "' + b"x" * 8192 for _ in range(10))
    response = app["client"].post("/v1/answer", content=chunks)
    assert response.status_code == 413


def test_replica_survives_bad_input(app):
    for path, body, _, _ in BAD_INPUT:
        app["client"].post(path, content=body)
    assert (
        _answer(app["client"], "Where was the red falcon0 seen?", num_beams=1, max_new_tokens=2)[
            "index_version"
        ]
        == "v0001"
    )


def _served_version(client: httpx.Client, want: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while (version := client.get("/v1/index").json()["version"]) != want:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return version


def test_serving_follows_the_published_pointer(app):
    from cluster.index_store import publish

    client = app["client"]
    publish(app["root"], "v0002")
    assert _served_version(client, "v0002") == "v0002"
    assert _answer(client, "comet3", num_beams=1, max_new_tokens=2)["index_version"] == "v0002"
    publish(app["root"], "v0001")
    assert _served_version(client, "v0001") == "v0001"


def test_admin_swap_needs_the_token(app):
    client = app["client"]
    assert client.post("/v1/admin/index/swap", json={"version": "v0002"}).status_code == 401
    wrong = {"authorization": "Bearer nope"}
    assert client.post("/v1/admin/index/swap", json={"version": "v0002"}, headers=wrong).status_code == 403
    unknown = client.post("/v1/admin/index/swap", json={"version": "v0009"}, headers=ADMIN)
    assert unknown.status_code == 404
    assert client.get("/v1/index").json()["version"] == "v0001"


def test_swap_during_traffic_drops_nothing(app):
    """A stream of requests runs while v0001 → v0002: none fails, each cites one version's
    passages, and every request sent after the swap returned cites v0002."""
    client, answered, swapped = app["client"], threading.Event(), threading.Event()

    def stream(worker: int) -> list[tuple[bool, dict]]:
        out, i = [], 0
        while True:
            sent_after_swap = swapped.is_set()
            out.append(
                (
                    sent_after_swap,
                    _answer(
                        client,
                        f"the {COLORS[(worker + i) % 8]} thing",
                        n_docs=3,
                        num_beams=1,
                        max_new_tokens=2,
                    ),
                )
            )
            answered.set()
            i += 1
            if sent_after_swap and i >= 2:
                return out

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(stream, w) for w in range(3)]
        assert answered.wait(60)
        swap = client.post("/v1/admin/index/swap", json={"version": "v0002"}, headers=ADMIN)
        swapped.set()
        results = [r for f in streams for r in f.result(timeout=120)]
    assert swap.status_code == 200, swap.text
    assert swap.json() == {"version": "v0002", "replicas": 1, "previous": "v0001"}
    texts = {"v0001": {p.text for p in CORPUS_V1}, "v0002": {p.text for p in CORPUS_V2}}
    assert {body["index_version"] for _, body in results} == {"v0001", "v0002"}
    for sent_after_swap, body in results:
        assert {d["text"] for d in body["docs"]} <= texts[body["index_version"]]
        assert body["index_version"] == "v0002" or not sent_after_swap
    assert client.get("/v1/index").json()["version"] == "v0002"


def test_rayrag_ask_prints_the_answer_and_its_sources(app, capsys):
    from rayrag_cli import build_parser

    args = build_parser().parse_args(
        [
            "ask",
            "Where was the red falcon0 seen?",
            "--url",
            app["url"],
            "--n-docs",
            "3",
            "--num-beams",
            "1",
            "--max-new-tokens",
            "2",
        ]
    )
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("Answer: ") and "Sources (index v000" in out and "only" not in out
    assert len([line for line in out.splitlines() if line.startswith("  [")]) == 3


def _kill_shard_replicas(client: httpx.Client, shards: list[int]) -> None:
    """SIGKILL the process of every ready replica of `shards` (pids from /healthz)."""
    report = client.get("/healthz").json()
    for shard in shards:
        for replica in report["shards"][shard]:
            if replica["state"] == "ready":
                os.kill(replica["pid"], signal.SIGKILL)


def _wait_for_full_coverage(client: httpx.Client, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.post(
            "/v1/answer", json={"question": "the red thing", "n_docs": 3, "num_beams": 1, "max_new_tokens": 2}
        )
        if response.status_code == 200 and response.json()["index_coverage"] == 1.0:
            return response.json()
        time.sleep(0.5)
    raise AssertionError("the shard group did not recover full coverage")


def test_dead_shards_degrade_visibly_then_recover(app):
    """Shard 0's only replica killed: answers go on from shard 1 with index_coverage 0.5, then
    full coverage once it is restarted. Every shard killed: 503 naming the shards, then answers."""
    client = app["client"]
    _wait_for_full_coverage(client)
    _kill_shard_replicas(client, [0])
    degraded = _answer(client, "the blue thing", n_docs=3, num_beams=1, max_new_tokens=2)
    assert degraded["index_coverage"] == 0.5 and len(degraded["docs"]) == 3
    _wait_for_full_coverage(client)
    _kill_shard_replicas(client, [0, 1])
    down = client.post("/v1/answer", json={"question": "the green thing", "n_docs": 3})
    assert down.status_code == 503, down.text
    assert "no live replica for shards [0, 1]" in down.json()["error"]["message"]
    _wait_for_full_coverage(client)
