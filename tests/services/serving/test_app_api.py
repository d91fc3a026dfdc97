"""The API schemas without Ray: body parsing, limits, OpenAI shapes, citations, app config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.serving.api import (
    MAX_BODY_BYTES,
    AnswerRequest,
    AnswerResponse,
    ApiError,
    ChatRequest,
    Doc,
    RetrieveRequest,
    chat_chunks,
    chat_completion,
    cited,
    parse_request,
    sse,
)
from services.serving.deployments import AppConfig
from services.serving.serve_file import read_serve_file


def _error(raw: bytes, schema=AnswerRequest) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_request(raw, schema)
    return caught.value


def test_defaults_and_strip():
    request = parse_request(b'{"question": "  who?  "}', AnswerRequest)
    assert (request.question, request.n_docs, request.mode) == ("who?", 5, "sequence")


@pytest.mark.parametrize("raw,status,needle", [
    (b"\xc3\x28", 400, "UTF-8"),
    (b"{'question': 1}", 400, "JSON"),
    (b"x" * (MAX_BODY_BYTES + 1), 413, "limit"),
    (b"null", 400, "JSON object"),
    (b'{"question": "q", "num_beams": 9}', 422, "num_beams"),
    (b'{"question": "q", "max_new_tokens": 0}', 422, "max_new_tokens"),
    (b'{"question": "q", "n_docs": "five"}', 422, "n_docs"),
    (b'{"question": "q", "typo": 1}', 422, "typo"),
])
def test_bad_bodies_name_the_problem(raw, status, needle):
    error = _error(raw)
    assert error.status == status and needle in error.message
    assert error.body()["error"]["message"] == error.message


def test_retrieve_needs_exactly_one_question_field():
    assert parse_request(b'{"questions": ["a", "b"]}', RetrieveRequest).all_questions() == ["a", "b"]
    for raw in (b'{"k": 2}', b'{"question": "a", "questions": ["b"]}'):
        with pytest.raises(ApiError, match="exactly one"):
            parse_request(raw, RetrieveRequest).all_questions()
    assert "questions.1" in _error(b'{"questions": ["a", " "]}', RetrieveRequest).message


def test_chat_takes_the_last_user_message_and_openai_fields():
    raw = json.dumps({"model": "m", "temperature": 0.2, "max_tokens": 7, "n_docs": 3,
                      "messages": [{"role": "user", "content": "first"},
                                   {"role": "assistant", "content": "x"},
                                   {"role": "user", "content": [{"type": "text", "text": "last"}]}]})
    request = parse_request(raw.encode(), ChatRequest)
    assert request.question() == "last"
    assert (request.options().max_new_tokens, request.options().n_docs) == (7, 3)
    assert "n" in _error(b'{"messages": [{"role": "user", "content": "q"}], "n": 2}', ChatRequest).message


def _answer(text: str) -> AnswerResponse:
    docs = [Doc(id=7, title="A", text="Kubrick directed it.", score=2.0, prob=0.3),
            Doc(id=9, title="B", text="Made in 1968.", score=3.0, prob=0.7)]
    return AnswerResponse(answer=text, mode="sequence", index_version="v0001", index_coverage=1.0,
                          docs=docs, timings_ms={"retrieve": 1, "generate": 2, "total": 4})


def test_citations_point_at_docs_holding_the_answer_else_the_likeliest():
    assert cited("Kubrick", _answer("").docs) == ("Kubrick [1]", [1])
    assert cited("nobody", _answer("").docs) == ("nobody [2]", [2])


def test_stream_reassembles_to_the_plain_completion():
    request = parse_request(b'{"messages": [{"role": "user", "content": "q"}]}', ChatRequest)
    answer = _answer("Stanley Kubrick")
    plain = chat_completion(request, answer)
    events = sse(chat_chunks(request, answer))
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"] == "Stanley Kubrick [2]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["docs"] == plain["docs"] and plain["index_version"] == "v0001"


def test_deploy_yaml_is_a_valid_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).parents[3] / "deploy.yaml"
    with open(path) as file:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(file))
    assert schema.http_options.host == "127.0.0.1"
    assert schema.controller_options.runtime_env["env_vars"] == \
        read_serve_file(str(path)).controller_options["runtime_env"]["env_vars"]


def test_app_config_from_deploy_yaml_and_bad_args():
    config = AppConfig.from_args(read_serve_file(str(Path(__file__).parents[3] / "deploy.yaml")).app_args)
    assert config.generator.deployment_options()["autoscaling_config"]["max_replicas"] >= 1
    assert config.retriever.query_encoder == "default" and config.generator.generator == "default"
    with pytest.raises(ValueError, match="unknown app args"):
        AppConfig.from_args({"modles": {}})
    with pytest.raises(ValueError, match="max_batch_size"):
        AppConfig.from_args({"generator": {"batch": {"max_batch_size": 0}}})


def test_serve_command_line_pins_an_index_version(tmp_path):
    """`rayrag serve --index-root R --index-version V` serves V without following R's pointer,
    and refuses, naming V, when V is not in R."""
    from rayrag_cli import build_parser
    from services.serving.cli import _ensure_index, serve_app_args

    args = build_parser().parse_args(["serve", "--index-root", str(tmp_path), "--index-version",
                                      "v0003", "--generator", "trained/generator"])
    app_args = serve_app_args(read_serve_file(), args)
    config = AppConfig.from_args(app_args)
    assert (config.retriever.index_root, config.retriever.version) == (str(tmp_path), "v0003")
    assert config.retriever.follow_s == 0 and config.generator.generator == "trained/generator"
    with pytest.raises(ValueError, match="'v0003' is not in"):
        _ensure_index(app_args["index"])
