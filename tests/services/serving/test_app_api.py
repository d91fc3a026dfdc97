"""The API schemas without Ray: validation, OpenAI shapes, citations, app config."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from services.serving.api import (
    AnswerRequest,
    AnswerResponse,
    ChatRequest,
    Doc,
    RetrieveRequest,
    chat_chunks,
    chat_completion,
    cited,
    sse,
)
from services.serving.config import AppConfig
from services.serving.conversation import Turn
from services.serving.serve_file import read_serve_file


def test_defaults_and_strip():
    request = AnswerRequest.model_validate({"question": "  who?  "})
    assert (request.question, request.n_docs, request.mode) == ("who?", 5, "sequence")


def test_retrieve_needs_exactly_one_question_field():
    assert RetrieveRequest.model_validate({"questions": ["a", "b"]}).all_questions() == ["a", "b"]
    for body in ({"k": 2}, {"question": "a", "questions": ["b"]}):
        with pytest.raises(ValidationError, match="exactly one of 'question' or 'questions'"):
            RetrieveRequest.model_validate(body)


def test_chat_takes_the_last_user_message_and_openai_fields():
    request = ChatRequest.model_validate_json(
        json.dumps(
            {
                "model": "m",
                "temperature": 0.2,
                "max_tokens": 7,
                "n_docs": 3,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "first"},
                    {"role": "assistant", "content": "x [2]"},
                    {"role": "user", "content": [{"type": "text", "text": " last "}]},
                    {"role": "assistant", "content": "a trailing answer is not a turn"},
                ],
            }
        )
    )
    assert request.turns() == [Turn("user", "first"), Turn("assistant", "x"), Turn("user", "last")]
    assert (request.options().max_new_tokens, request.options().n_docs) == (7, 3)
    with pytest.raises(ValidationError, match="no message with role 'user'"):
        ChatRequest.model_validate({"messages": [{"role": "system", "content": "q"}]})


def _answer(text: str) -> AnswerResponse:
    docs = [
        Doc(id=7, title="A", text="Kubrick directed it.", score=2.0, prob=0.3),
        Doc(id=9, title="B", text="Made in 1968.", score=3.0, prob=0.7),
    ]
    return AnswerResponse(
        answer=text,
        mode="sequence",
        index_version="v0001",
        index_coverage=1.0,
        docs=docs,
        timings_ms={"retrieve": 1, "generate": 2, "total": 4},
    )


def test_citations_point_at_docs_holding_the_answer_else_the_likeliest():
    assert cited("Kubrick", _answer("").docs) == ("Kubrick [1]", [1])
    assert cited("nobody", _answer("").docs) == ("nobody [2]", [2])


def test_stream_reassembles_to_the_plain_completion():
    request = ChatRequest.model_validate({"messages": [{"role": "user", "content": "q"}]})
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
    assert (
        schema.controller_options.runtime_env["env_vars"]
        == read_serve_file(str(path)).controller_options["runtime_env"]["env_vars"]
    )


def test_app_config_from_deploy_yaml_and_bad_args():
    config = AppConfig.parse(read_serve_file(str(Path(__file__).parents[3] / "deploy.yaml")).app_args)
    assert config.generator.deployment_options()["autoscaling_config"]["max_replicas"] >= 1
    assert config.models.query_encoder == "default" and config.models.generator == "default"
    assert config.index.shard_cpus == 0.25 and config.retriever.batch.max_batch_size == 32
    assert (config.generator.torch_threads, config.generator.torch_threads_alone) == (1, 2)
    assert config.models.precision == "auto" and config.index.search.faiss_threads == 1
    with pytest.raises(ValueError, match="unknown config key 'args.modles'"):
        AppConfig.parse({"modles": {}}, "args.")
    with pytest.raises(ValueError, match="'args.generator.batch.max_batch_size' must be >= 1, got 0"):
        AppConfig.parse({"generator": {"batch": {"max_batch_size": 0}}}, "args.")
    with pytest.raises(ValueError, match="unknown config key 'args.index.shard_num_cpus'"):
        AppConfig.parse({"index": {"shard_num_cpus": 1}}, "args.")
    assert AppConfig().index.index_root == AppConfig.parse({"index": {}}).index.index_root  # the cache's


def test_deploy_args_reach_the_deployments_unchanged(monkeypatch, tmp_path):
    """Every index key of deploy.yaml's args (here allow_partial, call_timeout_s, search_params) is in
    the config the Retriever hands its shard group; the models reach the Generator's engine."""
    from cluster import encoders, shard_group
    from services.serving.app import build_app
    from services.serving.retriever_deployment import RetrieverDeployment

    args = {
        "index": {
            "root": str(tmp_path),
            "allow_partial": False,
            "call_timeout_s": 7,
            "follow_s": 0,
            "search": {"search_params": {"efSearch": 64}, "cache_dir": str(tmp_path / "cache")},
        },
        "models": {"query_encoder": "q-enc", "generator": "gen", "precision": "float32"},
    }
    ingress = build_app(args)._bound_deployment
    retriever, generator = (app._bound_deployment for app in ingress.init_args[:2])
    built, group = [], SimpleNamespace(close=lambda: None)
    monkeypatch.setattr(shard_group, "ShardGroup", lambda config, version: built.append(config) or group)
    encoder = SimpleNamespace(normalize=True, eval=lambda: encoder)
    monkeypatch.setattr(encoders.TextEncoder, "from_pretrained", lambda name: built.append(name) or encoder)
    RetrieverDeployment.func_or_class(*retriever.init_args)
    name, index = built
    assert name == "q-enc" and index == AppConfig.parse(args).index
    assert (index.allow_partial, index.call_timeout_s) == (False, 7.0)
    assert index.search.search_params == {"efSearch": 64.0}
    assert index.search.cache_dir == str(tmp_path / "cache")
    assert generator.init_args[1] == AppConfig.parse(args).models


def test_serve_file_is_read_with_serves_schema(tmp_path):
    """The HTTP and controller options and the app come from Serve's schema; a bad file is refused
    naming the key, and so is a file without exactly one rayrag application."""
    served = read_serve_file(str(Path(__file__).parents[3] / "deploy.yaml"))
    assert served.http_options == {"host": "127.0.0.1", "port": 8000}
    assert (served.app.name, served.app.route_prefix) == ("rayrag", "/")
    served.app_args["index"]["root"] = "elsewhere"  # a copy: the file's args stay as read
    assert served.app_args["index"]["root"] == "~/.cache/rayrag/index"
    bad = tmp_path / "deploy.yaml"
    bad.write_text("http_options: {port: eighty}\napplications: []\n")
    with pytest.raises(ValueError, match="config key 'http_options.port' has a bad value 'eighty'"):
        read_serve_file(str(bad))
    bad.write_text("applications: [{name: other, import_path: other.app:build}]\n")
    with pytest.raises(ValueError, match="expected one application with import_path"):
        read_serve_file(str(bad))


def test_serve_command_line_pins_an_index_version(tmp_path):
    """`rayrag serve --index-root R --index-version V` serves V without following R's pointer,
    and refuses, naming V, when V is not in R."""
    from cluster.bootstrap import IndexSpec, ensure_index
    from rayrag_cli import build_parser
    from services.serving.cli import serve_app_args

    args = build_parser().parse_args(
        [
            "serve",
            "--index-root",
            str(tmp_path),
            "--index-version",
            "v0003",
            "--generator",
            "trained/generator",
        ]
    )
    config = AppConfig.parse(serve_app_args(read_serve_file(), args))
    assert (config.index.index_root, config.index.version) == (str(tmp_path), "v0003")
    assert config.index.follow_s == 0 and config.models.generator == "trained/generator"
    with pytest.raises(ValueError, match="'v0003' is not in"):
        ensure_index(IndexSpec.of(config.index, config.models.doc_encoder))


def test_serve_command_line_takes_an_object_store_root(s3_root: str, tmp_path) -> None:
    """`rayrag serve --index-root s3://…` keeps the URI as given and serves the version published there
    (no build); a shard cache directory from deploy.yaml reaches the Retriever's config."""
    import shutil

    import numpy as np

    from cluster.bootstrap import IndexSpec, ensure_index
    from cluster.index_build import build_index_from_vectors
    from cluster.index_store import commit_version, load_manifest, publish, staging_dir, version_dir
    from cluster.passages import Passage
    from rayrag_cli import build_parser
    from services.serving.cli import serve_app_args

    root = f"{s3_root}/served-by-cli"
    vectors = np.eye(4, dtype=np.float32)
    local = build_index_from_vectors(vectors, [Passage(i, "t", "p") for i in range(4)], tmp_path)
    staged = staging_dir(root)
    shutil.copytree(version_dir(tmp_path, local), staged, dirs_exist_ok=True)
    publish(root, commit_version(root, staged, load_manifest(tmp_path, local)))
    args = build_parser().parse_args(["serve", "--index-root", root])
    app_args = serve_app_args(read_serve_file(), args)
    app_args["index"]["search"] = {"cache_dir": str(tmp_path / "cache")}
    config = AppConfig.parse(app_args)
    assert (config.index.index_root, config.index.search.cache_dir) == (root, str(tmp_path / "cache"))
    ensure_index(IndexSpec.of(config.index, config.models.doc_encoder))  # v0001 published: no build
