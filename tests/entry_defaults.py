"""Prints, as JSON, the effective defaults of each entry point (`rayrag ask --local`, `rayrag ask`
over HTTP, `rayrag serve`'s app from deploy.yaml, the API's default requests, `rayrag eval`, the
experiment presets), keyed by leaf name so that a config moved into a sub-config compares equal.
Run it on two commits and diff the outputs: `python tests/entry_defaults.py > before.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from unittest import mock

from pydantic import BaseModel

import rayrag_cli


class Captured(Exception):
    pass


def leaves(value: Any, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """{leaf name: value} of a config (dumped) or dict, nested sections flattened."""
    out = {} if out is None else out
    if isinstance(value, BaseModel):
        value = value.model_dump()
    for key, item in value.items():
        if isinstance(item, BaseModel) or (isinstance(item, dict) and key != "search_params"):
            leaves(item, out)
        else:
            out[key] = list(item) if isinstance(item, tuple) else item
    return out


def capture(argv: list[str], target: str) -> Any:
    """The first argument `target` receives when `rayrag ARGV` runs."""
    seen = []

    def grab(*args: Any, **kwargs: Any) -> None:
        seen.append(args[-1] if args else next(iter(kwargs.values())))
        raise Captured

    args = rayrag_cli.build_parser().parse_args(argv)
    with mock.patch(target, grab):
        try:
            args.run(args)
        except Captured:
            pass
    return seen[0]


def ask_http() -> dict[str, Any]:
    request = capture(["ask", "Q"], "urllib.request.urlopen")
    return json.loads(request.data)


def app_config() -> dict[str, Any]:
    from services.serving import cli
    from services.serving.serve_file import read_serve_file

    args = rayrag_cli.build_parser().parse_args(["serve"])
    app_args = cli.serve_app_args(read_serve_file(args.config), args)
    try:
        from services.serving.config import AppConfig
    except ImportError:
        from services.serving.deployments import AppConfig
    config = AppConfig.from_args(app_args) if hasattr(AppConfig, "from_args") else AppConfig.parse(app_args)
    dumped = config.model_dump()
    return {part: leaves(dumped[part]) for part in ("retriever", "generator", "ingress")} | {
        "models": leaves(dumped["models"]) if "models" in dumped else None,
        "index": leaves(dumped["index"]) if "index" in dumped else None,
    }


def api_requests() -> dict[str, Any]:
    from services.serving.api import AnswerRequest, ChatRequest

    chat = ChatRequest(messages=[{"role": "user", "content": "Q"}]).model_dump()
    return {"answer": leaves(AnswerRequest(question="Q")), "chat": leaves({**chat, "messages": None})}


def eval_config() -> dict[str, Any]:
    from training.evaluate import EvalConfig

    argv = ["eval", "--data", "squad-dev", "--corpus", "default"]
    parse = EvalConfig.parse
    config = capture(argv, "training.evaluate.EvalConfig.parse")
    config = parse(config) if isinstance(config, dict) else config
    args = rayrag_cli.build_parser().parse_args(argv)
    names = ("query_encoder", "doc_encoder", "generator", "precision", "corpus_limit", "limit")
    return leaves(config) | {name: getattr(args, name) for name in names}


def presets() -> dict[str, Any]:
    from training.experiment import PRESETS, load_experiment

    out = {}
    for name in PRESETS:
        cfg = load_experiment(name, None)
        train = cfg.train_config(Path("/out"), False, train_data="squad-dev")
        out[name] = {"eval": leaves(cfg.eval), "models": leaves(cfg.models), "train": leaves(train)}
    return out


def main() -> None:
    report = {
        "ask_local": leaves(capture(["ask", "--local", "Q"], "services.rag.local.LocalRag.from_config")),
        "ask_http": ask_http(),
        "serve_app": app_config(),
        "api_defaults": api_requests(),
        "eval": eval_config(),
        "experiment": presets(),
    }
    json.dump(report, sys.stdout, indent=1, sort_keys=True, default=str)
    print()


if __name__ == "__main__":
    main()
