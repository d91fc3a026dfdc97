"""`rayrag` subcommands owned by the services package."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, get_args

from cluster.fusion import Retriever
from cluster.runtime import init_ray
from services.serving.serve_file import ServeFile, read_serve_file

if TYPE_CHECKING:
    from services.serving.config import IndexArgs, ModelsArgs

log = logging.getLogger(__name__)
SCORE_LABELS = {"dense": "q·d", "bm25": "BM25", "hybrid": "fused"}  # hybrid's is no similarity


def run_ask(args: argparse.Namespace) -> int:
    """`ask --local`: answer one question in this process and print the answer with its sources."""
    from services.rag.local import LocalConfig, LocalRag

    raw = {key: getattr(args, key) for key in LocalConfig.model_fields if key != "retrieval"}
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
    ask = subcommands.add_parser("ask", help="answer a question with RAG (--local: one process, no Ray)")
    ask.add_argument("question")
    ask.add_argument("--local", action="store_true", help="load everything in this process")
    ask.add_argument("--corpus", default="default", help="default | squad-open | FILE.jsonl | FILE.json")
    ask.add_argument("--limit", type=int, default=None, help="use only the first N passages")
    ask.add_argument("--n-docs", type=int, default=5, help="passages retrieved (K)")
    ask.add_argument(
        "--retriever",
        choices=get_args(Retriever),
        default=None,
        help="dense | bm25 | hybrid (default: dense with --local, else the server's args.retrieval)",
    )
    ask.add_argument(
        "--mode", choices=["sequence", "token"], default="sequence", help="RAG-Sequence or RAG-Token"
    )
    ask.add_argument(
        "--decoding",
        choices=["thorough", "fast"],
        default="fast",
        help="RAG-Sequence decoding (thorough: rescore every hypothesis under all K passages)",
    )
    ask.add_argument("--num-beams", type=int, default=4)
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.add_argument("--encoder", default="default", help="query encoder: name or path")
    ask.add_argument("--doc-encoder", default=None, help="document encoder (default: same as --encoder)")
    ask.add_argument("--generator", default="default", help="generator: name, path or .gguf file")
    ask.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="generator weights (auto: bfloat16 where the CPU or GPU multiplies it natively)",
    )
    ask.add_argument(
        "--cache-dir",
        default=None,
        help="converted models and vectors (default $RAYRAG_CACHE, else ~/.cache/rayrag)",
    )
    ask.set_defaults(run=run_ask)


def register(subcommands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands; each sets `run(args) -> int`."""
    _add_ask(subcommands)
    _add_serving(subcommands)


# ---- serving: `rayrag serve` (the main job) and `rayrag ask` over HTTP (owner: serving) ----
DEFAULT_URL = "http://127.0.0.1:8000"


def serve_app_args(config: ServeFile, args: argparse.Namespace) -> dict:
    """The config file's app args with the command line's models and index on top; a pinned
    `--index-version` stops the app from following the root's published pointer."""
    app_args = config.app_args
    models = {
        key: value
        for key, value in (("generator", args.generator), ("query_encoder", args.query_encoder))
        if value
    }
    app_args["models"] = {**(app_args.get("models") or {}), **models}
    index = dict(app_args.get("index") or {})
    if args.index_root:
        index["root"] = args.index_root
    if args.index_version:
        index.update(version=args.index_version, follow_s=0)
    app_args["index"] = index
    return app_args


def _ensure_index(index: IndexArgs) -> None:
    """Build and publish the index the app serves when its root has no published version; a
    pinned version must already be there."""
    from cluster.index_build import build_index
    from cluster.index_store import list_versions, published_version
    from cluster.passages import load_corpus

    root = index.index_root
    if index.version:
        versions = list_versions(root)
        if index.version not in versions:
            raise ValueError(f"index version {index.version!r} is not in {root}; it has {versions}")
        log.info("index: %s (version %s, pinned)", root, index.version)
        return
    if published_version(root) is not None:
        log.info("index: %s (version %s)", root, published_version(root))
        return
    log.info("index: none at %s; building it from corpus %r (once)", root, index.corpus)
    passages = load_corpus(index.corpus)
    version = build_index(passages, root, encoder=index.encoder, shards=index.shards)
    log.info("index: built and published %s (%d passages)", version, len(passages))


def _warm_models(models: ModelsArgs) -> None:
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

    from services.serving.app import build_app
    from services.serving.config import AppArgs

    config = read_serve_file(args.config)
    http, app, app_args = config.http_options, config.app, serve_app_args(config, args)
    if args.port is not None:
        http["port"] = args.port
    parsed = AppArgs.parse(app_args, "args.")  # every bad key named before Ray starts
    init_ray(log_to_driver=False)  # $RAY_ADDRESS when set, else a local Ray on 127.0.0.1
    _ensure_index(parsed.index)
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

    body = {
        "question": args.question,
        "n_docs": args.n_docs,
        "mode": args.mode,
        "decoding": args.decoding,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
    }
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


def _add_serving(subcommands: argparse._SubParsersAction) -> None:
    serve_cmd = subcommands.add_parser(
        "serve", help="the main job: build the index if absent, serve RAG on 127.0.0.1:8000"
    )
    serve_cmd.add_argument(
        "--config", default=None, help="a Serve config file (default: ./deploy.yaml, else the packaged one)"
    )
    serve_cmd.add_argument("--port", type=int, default=None, help="override http_options.port")
    serve_cmd.add_argument(
        "--generator",
        default=None,
        help="generator name or path (e.g. EXPORT/generator from `rayrag export`)",
    )
    serve_cmd.add_argument(
        "--query-encoder", default=None, help="query encoder name or path (e.g. EXPORT/query_encoder)"
    )
    serve_cmd.add_argument("--index-root", default=None, help="override index.root")
    serve_cmd.add_argument(
        "--index-version",
        default=None,
        help="serve this version and do not follow the published pointer "
        "(e.g. the one a checkpoint with a trained doc encoder names)",
    )
    serve_cmd.set_defaults(run=run_serve)
    ask = subcommands.choices["ask"]
    ask.add_argument("--url", default=DEFAULT_URL, help="the running app (without --local)")
    ask.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    ask.set_defaults(run=_run_ask_any)
