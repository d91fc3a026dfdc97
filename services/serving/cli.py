"""`rayrag` subcommands owned by the services package."""

from __future__ import annotations

import argparse
import logging

from cluster.flags import add_config_flags, flag_values
from cluster.runtime import init_ray
from services.rag.config import DecodingConfig, ModelsConfig
from services.serving.serve_file import PACKAGED, ServeFile, read_serve_file

log = logging.getLogger(__name__)
SCORE_LABELS = {"dense": "q·d", "bm25": "BM25", "hybrid": "fused"}  # hybrid's is no similarity
DECODING_FLAGS = tuple(DecodingConfig.model_fields)
MODEL_FLAGS = tuple(ModelsConfig.model_fields)
LOCAL_FLAGS = ("corpus", "limit", *MODEL_FLAGS, "cache_dir")  # a LocalConfig's, with DECODING_FLAGS


def run_ask(args: argparse.Namespace) -> int:
    """`ask --local`: answer one question in this process and print the answer with its sources."""
    from services.rag.local import LocalConfig, LocalRag

    raw = flag_values(args, (*DECODING_FLAGS, *LOCAL_FLAGS))
    config = LocalConfig.parse(raw | {"retrieval": {"retriever": args.retriever or "dense"}})
    [answer] = LocalRag.from_config(config).ask([args.question])
    label = SCORE_LABELS[config.retrieval.retriever]
    print(f"Answer: {answer.answer}")
    print(f"Sources ({config.retrieval.retriever} retriever):")
    for rank, source in enumerate(answer.sources, start=1):
        print(
            f"  {rank}. {source.title} ({source.found_by}, {label} {source.score:.3f}, passage {source.id})"
        )
    return 0


def _add_ask(subcommands: argparse._SubParsersAction) -> None:
    """`rayrag ask`: the request's flags (a DecodingOptions), then --local's and HTTP's own."""
    from services.rag.local import LocalConfig
    from services.serving.api import DecodingOptions

    ask = subcommands.add_parser("ask", help="answer a question with RAG (--local: one process, no Ray)")
    ask.add_argument("question")
    add_config_flags(ask, DecodingOptions, (*DECODING_FLAGS, "retriever"))
    local = ask.add_argument_group("--local", "answer in this process: the corpus and the models it loads")
    local.add_argument("--local", action="store_true", help="load everything in this process")
    add_config_flags(local, LocalConfig, LOCAL_FLAGS)
    http = ask.add_argument_group("HTTP", "ask the running app (without --local)")
    http.add_argument("--url", default=DEFAULT_URL, help="the running app (default: %(default)s)")
    http.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    ask.set_defaults(run=_run_ask_any)


def register(subcommands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands; each sets `run(args) -> int`."""
    _add_ask(subcommands)
    _add_serve(subcommands)


# ---- `rayrag serve` (the main job) and `rayrag ask` over HTTP ----
DEFAULT_URL = "http://127.0.0.1:8000"


def serve_app_args(config: ServeFile, args: argparse.Namespace) -> dict:
    """The config file's app args with the command line's models and index on top; a pinned
    `--index-version` stops the app from following the root's published pointer."""
    app_args = config.app_args
    models = {key: value for key, value in flag_values(args, MODEL_FLAGS).items() if value is not None}
    app_args["models"] = {**(app_args.get("models") or {}), **models}
    index = dict(app_args.get("index") or {})
    if args.index_root:
        index["root"] = args.index_root
    if args.index_version:
        index.update(version=args.index_version, follow_s=0)
    app_args["index"] = index
    return app_args


def _warm_models(models: ModelsConfig) -> None:
    """Convert the default generator once here (≈40 s) so replicas load it in under a second."""
    from services.rag.loading import cached_gguf, default_gguf_path

    if models.generator == "default":
        log.info("models: preparing the default generator (converted once, then cached)")
        cached_gguf(default_gguf_path())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    """The main job: Ray, the index (built if absent), the models, the Serve app; until Ctrl-C."""
    import signal
    import time

    from ray import serve

    from cluster.bootstrap import IndexSpec, ensure_index
    from services.serving.app import build_app
    from services.serving.config import AppConfig

    config = read_serve_file(args.config)
    http, app, app_args = config.http_options, config.app, serve_app_args(config, args)
    if args.port is not None:
        http["port"] = args.port
    parsed = AppConfig.parse(app_args, "args.")  # every bad key named before Ray starts
    init_ray(log_to_driver=False)  # $RAY_ADDRESS when set, else a local Ray on 127.0.0.1
    ensure_index(IndexSpec.of(parsed.index, parsed.models.doc_encoder), show_progress=True)
    _warm_models(parsed.models)
    serve.start(http_options=http, controller_options=config.controller_options or None)
    serve.run(build_app(app_args), name=app.name, route_prefix=app.route_prefix)
    url = f"http://{http['host']}:{http['port']}"
    print(
        f"\nrayrag is serving on {url} (API docs: {url}/docs). Try:\n"
        f'  rayrag ask "Who directed 2001: A Space Odyssey?"\n'
        f"  curl -s {url}/v1/answer -H 'content-type: application/json' "
        f'-d \'{{"question": "Who directed 2001: A Space Odyssey?"}}\'\n'
        f"Ctrl-C stops it.",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping rayrag")
    finally:
        serve.shutdown()
    return 0


def ask_http(args: argparse.Namespace) -> int:
    """`rayrag ask` against the running app: POST /v1/answer, print the answer and sources."""
    import json
    import urllib.error
    import urllib.request

    body = {"question": args.question, **flag_values(args, DECODING_FLAGS)}
    if args.retriever is not None:
        body["retriever"] = args.retriever
    request = urllib.request.Request(
        f"{args.url.rstrip('/')}/v1/answer",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as error:
        raise ValueError(json.load(error).get("error", {}).get("message", str(error))) from error
    except (urllib.error.URLError, ConnectionError) as error:
        raise ValueError(
            f"no rayrag server at {args.url} ({error}); start one with "
            f"`rayrag serve`, or use `rayrag ask --local`"
        ) from error
    print(f"Answer: {answer['answer']}")
    partial = (
        f", only {answer['index_coverage']:.0%} of the index answered" if answer["index_coverage"] < 1 else ""
    )
    print(f"Sources (index {answer['index_version']}, {answer['mode']}{partial}):")
    for rank, doc in enumerate(answer["docs"], start=1):
        found = f"{doc['retriever']}, p={doc['prob']:.2f}, passage {doc['id']}"
        print(f"  [{rank}] {doc['title']} ({found}): {doc['text'][:100]}")
    return 0


def _run_ask_any(args: argparse.Namespace) -> int:
    return run_ask(args) if args.local else ask_http(args)


def _add_serve(subcommands: argparse._SubParsersAction) -> None:
    serve_cmd = subcommands.add_parser(
        "serve", help="the main job: build the index if absent, serve RAG on 127.0.0.1:8000"
    )
    serve_cmd.add_argument(
        "--config",
        default=None,
        help=f"a Serve config file (default: ./deploy.yaml when the current folder has one, else {PACKAGED})",
    )
    serve_cmd.add_argument("--port", type=int, default=None, help="override http_options.port")
    add_config_flags(serve_cmd, ModelsConfig, MODEL_FLAGS, overriding="args.models")
    serve_cmd.add_argument("--index-root", default=None, help="override index.root")
    serve_cmd.add_argument(
        "--index-version",
        default=None,
        help="serve this version and do not follow the published pointer "
        "(e.g. the one a checkpoint with a trained doc encoder names)",
    )
    serve_cmd.set_defaults(run=run_serve)
