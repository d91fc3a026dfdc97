"""Prints, as JSON, the effective defaults of each entry point (`rayrag ask --local`, `rayrag ask`
over HTTP, `rayrag serve`'s app from deploy.yaml, the API's default requests, `rayrag eval`, the
experiment presets), keyed by leaf name so that a config moved into a sub-config compares equal.
Run it on two commits (`python tests/entry_defaults.py > before.json`), then
`python tests/entry_defaults.py compare before.json after.json`: each changed value, added or removed key."""

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
    sections = {key for key, item in value.items() if isinstance(item, dict) and key != "search_params"}
    for key, item in value.items():  # a section's key does not hide the same key of its config
        if key not in sections:
            out.setdefault(key, list(item) if isinstance(item, tuple) else item)
    for key in sections:
        leaves(value[key], out)
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
    """The configs each deployment of `rayrag serve`'s app is bound with (deploy.yaml, no flags)."""
    from services.serving import cli
    from services.serving.app import build_app
    from services.serving.serve_file import read_serve_file

    args = rayrag_cli.build_parser().parse_args(["serve"])
    ingress = build_app(cli.serve_app_args(read_serve_file(args.config), args))._bound_deployment
    retriever, generator = (app._bound_deployment for app in ingress.init_args[:2])
    out = {}
    for name, deployment in (("retriever", retriever), ("generator", generator), ("ingress", ingress)):
        out[name] = {}
        for part in deployment.init_args:
            if isinstance(part, BaseModel):
                leaves(part, out[name])
            elif name == "ingress" and not hasattr(part, "_bound_deployment"):
                out[name]["admin_token"] = part
    return out


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
    models = {name: getattr(args, name) for name in ("query_encoder", "doc_encoder", "generator")}
    try:  # doc_encoder None: the query encoder's
        from services.rag.config import ModelsConfig

        models = ModelsConfig.parse(models).model_dump(exclude={"precision"})
    except ImportError:
        pass
    names = ("precision", "corpus_limit", "limit")
    return leaves(config) | models | {name: getattr(args, name) for name in names}


def presets() -> dict[str, Any]:
    from training.experiment import PRESETS, load_experiment

    out = {}
    for name in PRESETS:
        cfg = load_experiment(name, None)
        train = cfg.train_config(Path("/out"), False, train_data="squad-dev")
        out[name] = {"eval": leaves(cfg.eval), "models": leaves(cfg.models), "train": leaves(train)}
    return out


RENAMED = {
    "encoder": "query_encoder",
    "shard_replicas": "replicas",
    "shard_cache_dir": "cache_dir",
    "root": "index_root",
}


def compare(before: dict, after: dict, path: str = "") -> None:
    """Prints each value that differs, and each key one side lacks (keys renamed since: RENAMED)."""
    if "doc_encoder" in before and before["doc_encoder"] is None:  # None meant the query encoder's
        before = {**before, "doc_encoder": before.get("encoder", before.get("query_encoder"))}
    before = {RENAMED.get(key, key): value for key, value in before.items()}
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key, "<absent>"), after.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            compare(old, new, f"{path}{key}.")
        elif old == "<absent>" or new == "<absent>":
            change, value = ("added  ", new) if old == "<absent>" else ("removed", old)
            print(f"{change} {path}{key} = {value!r}")
        elif old != new:
            print(f"CHANGED {path}{key}: {old!r} -> {new!r}")


def main() -> None:
    if sys.argv[1:2] == ["compare"]:
        compare(*(json.loads(Path(name).read_text()) for name in sys.argv[2:4]))
        return
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
