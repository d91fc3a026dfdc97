"""Bounded load on the Serve app over HTTP on 127.0.0.1: throughput, p50/p99, Serve overhead, batching.

Starts a local Ray and the app as deploy.yaml configures it (controller options, replica CPUs,
threads and batching; one Generator replica, so that batching is what changes), with tiny
models by default or `--default-models`, over an index it builds in a temporary folder. Sends
`--requests` answers at each concurrency, then redeploys with batching off and repeats the
highest concurrency. Serve overhead = client end-to-end latency minus the model time the
replicas measured in process (retrieve + generate). Its reference is the floor: the same request
shape (proxy → Ingress → two by-value handle hops) through deployments that do no work, measured
in the same run. Batching's reference is the generator's own ceiling: one batch against the same
questions one at a time, in this process. Each level also reports the CPU its Serve processes
spent per answer. The answer latency's reference is a plain transformers loop (bench/
transformers_loop.py): on the first `--loop-questions` questions, with the passages and doc
scores the app returned for them, one `generate` per passage and RAG-Sequence "fast"
marginalisation, on all cores in this process; loop_speedup = its p50 / the app's p50 at
concurrency 1. Streams: the first content chunk of the default streamed chat request at
concurrency 1 (`first_chunk_p50_s_c1`), and whether each streamed text equals the plain answer of
the same request with the streaming decoding (`stream_equals_answer`). The latency levers'
reference is the exact decoding (every passage decoded) in this process on the loop's questions,
with the passages and doc scores the app returned: `answers_identical_vs_exact` of
`answers_compared_vs_exact`. Failed requests are counted by status code (`failed_c8`, `codes`),
never raised. The last line printed is one JSON object with every figure, also after an error.

With `--default-models` the request is the app's default (K=5, RAG-Sequence "fast", 4 beams,
32 new tokens) over a fixed list of questions whose answers are in the first passages of the
default corpus; tiny models default to 1 beam and 8 new tokens over "What is known about X?".

    python bench/serve.py                       # tiny models, 500 requests at 1, 8, 16
    python bench/serve.py --default-models      # 16 requests a level, about 10 min on 2 cores
"""

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI, Request
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.tiny_models, bench.*

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (title, question) whose answer is in the title's first passage of the default corpus, all
# within its first 200 passages.
DECODING_KEYS = ("mode", "decoding", "num_beams", "max_new_tokens")  # of a request body
DEFAULT_QUESTIONS = (
    ("2001: A Space Odyssey", "Who directed 2001: A Space Odyssey?"),
    ("Adventures of Huckleberry Finn", "Who wrote Adventures of Huckleberry Finn?"),
    ("Anna Karenina", "Who wrote Anna Karenina?"),
    ("Arnolfini Portrait", "Who painted the Arnolfini Portrait?"),
    ("Brave New World", "Who wrote Brave New World?"),
    ("Carmen", "Who composed the opera Carmen?"),
    ("Citizen Kane", "Who directed Citizen Kane?"),
    ("Burj Khalifa", "In which city is the Burj Khalifa?"),
    (
        "A Sunday Afternoon on the Island of La Grande Jatte",
        "Who painted A Sunday Afternoon on the Island of La Grande Jatte?",
    ),
    ("The Adventures of Tintin", "Who created The Adventures of Tintin?"),
    ("Aeneid", "Who wrote the Aeneid?"),
    ("Al-Jabr", "Who wrote Al-Jabr?"),
    ("Alhambra", "In which city is the Alhambra?"),
    ("Alice's Adventures in Wonderland", "Who wrote Alice's Adventures in Wonderland?"),
    (
        "Along the River During the Qingming Festival",
        "Who painted Along the River During the Qingming Festival?",
    ),
    ("Anabasis (Xenophon)", "Who wrote the Anabasis?"),
    ("Angkor Wat", "In which country is Angkor Wat?"),
    ("Batman", "Who created Batman?"),
    ("Battleship Potemkin", "Who directed Battleship Potemkin?"),
    ("Bicycle Thieves", "Who directed Bicycle Thieves?"),
    ("Bohemian Rhapsody", "Who wrote Bohemian Rhapsody?"),
    ("Brandenburg Concertos", "Who composed the Brandenburg Concertos?"),
    ("Breathless (1960 film)", "Who directed the film Breathless?"),
    ("The Brothers Karamazov", "Who wrote The Brothers Karamazov?"),
    ("Campbell's Soup Cans", "Who painted Campbell's Soup Cans?"),
    ("Candide", "Who wrote Candide?"),
    ("The Canterbury Tales", "Who wrote The Canterbury Tales?"),
    ("Casablanca (film)", "Who directed Casablanca?"),
    ("The Catcher in the Rye", "Who wrote The Catcher in the Rye?"),
    ("A Christmas Carol", "Who wrote A Christmas Carol?"),
    ("The Color Purple", "Who wrote The Color Purple?"),
    ("Colosseum", "In which city is the Colosseum?"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=None, help="requests per concurrency level (500; default models 16)"
    )
    parser.add_argument("--concurrency", default="1,8,16", help="comma-separated levels")
    parser.add_argument(
        "--default-models",
        action="store_true",
        help="all-MiniLM-L6-v2 + SmolLM2-135M and the app's default request, instead of tiny random models",
    )
    parser.add_argument("--corpus-limit", type=int, default=2000, help="passages of the default corpus")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--num-beams", type=int, default=None, help="default: 4, tiny models 1")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 32, tiny models 8")
    parser.add_argument(
        "--loop-questions",
        type=int,
        default=6,
        help="questions the transformers loop and the exact decoding answer (0: none)",
    )
    parser.add_argument("--stream-questions", type=int, default=8, help="questions asked streamed (0: none)")
    parser.add_argument(
        "--ceiling-batch",
        type=int,
        default=None,
        help="batch of the generator's ceiling (top level; default models 4; 0: none)",
    )
    parser.add_argument("--config", default=None, help="the Serve config file (default: deploy.yaml)")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 16 if args.default_models else 500
    args.levels = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 1 or min(args.levels) < 1 or args.loop_questions < 0:
        raise SystemExit(
            f"--requests and --concurrency must be ≥ 1 and --loop-questions ≥ 0, got "
            f"{args.requests}, {args.levels}, {args.loop_questions}"
        )
    # The app's default request; tiny random generators rarely emit EOS, so they decode every
    # one of max_new_tokens: fewer beams and tokens keep them quick.
    if args.num_beams is None:
        args.num_beams = 4 if args.default_models else 1
    if args.max_new_tokens is None:
        args.max_new_tokens = 32 if args.default_models else 8
    return args


def build_index_and_models(args: argparse.Namespace, tmp: Path, app_args: dict) -> tuple[dict, list]:
    """`app_args` over an index of the first passages of the default corpus and the chosen models."""
    from cluster.index_build import build_index
    from cluster.passages import load_corpus
    from tests.tiny_models import save_tiny_encoder, save_tiny_generator

    if args.default_models:
        encoder, generator = "default", "default"
    else:
        encoder = save_tiny_encoder(tmp / "encoder")
        generator = save_tiny_generator(tmp / "generator")
    passages = load_corpus("default", limit=args.corpus_limit)
    build_index(passages, tmp / "index", encoder=encoder, shards=args.shards, show_progress=False)
    generator_args = {k: v for k, v in (app_args.get("generator") or {}).items() if k != "autoscaling_config"}
    return {
        **app_args,
        "index": {**app_args.get("index", {}), "root": str(tmp / "index"), "follow_s": 0},
        "models": {"query_encoder": encoder, "generator": generator},
        "generator": {**generator_args, "num_replicas": 1},
    }, passages


def question_pool(args: argparse.Namespace, passages: list) -> list[str]:
    """The distinct questions asked: DEFAULT_QUESTIONS whose titles are in `passages` with the
    default models, else "What is known about X?" on `--requests` random passages."""
    if not args.default_models:
        picks = np.random.default_rng(0).integers(0, len(passages), args.requests)
        return [f"What is known about {passages[i].title}?" for i in picks]
    titles = {p.title for p in passages}
    pool = [question for title, question in DEFAULT_QUESTIONS if title in titles]
    if not pool:
        raise SystemExit(f"no title of DEFAULT_QUESTIONS is in the first {len(passages)} passages")
    return pool


def deploy(app_args: dict, batching: bool) -> None:
    """(Re)deploy the app with the config's batching, or with every batch size set to 1."""
    from services.serving.app import build_app

    args = dict(app_args)
    if not batching:
        for part in ("retriever", "generator"):
            args[part] = {**(args.get(part) or {}), "batch": {"max_batch_size": 1}}
    serve.run(build_app(args), name="bench", route_prefix="/")


async def load(url: str, questions: list[str], concurrency: int, body: dict) -> dict:
    """Send every question with at most `concurrency` in flight; latency and model-time stats of
    the answers, and the failures by status code."""
    latencies, model_ms, ingress_ms, codes = [], [], [], Counter()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for question in questions:
        queue.put_nowait(question)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            question = queue.get_nowait()
            start = time.perf_counter()
            response = await client.post("/v1/answer", json={**body, "question": question})
            if response.status_code != 200:
                codes[str(response.status_code)] += 1
                continue
            latencies.append((time.perf_counter() - start) * 1000)
            timings = response.json()["timings_ms"]
            model_ms.append(timings["retrieve"] + timings["generate"])
            ingress_ms.append(timings["total"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies)
    overhead = lat - np.array(model_ms)  # (N,) HTTP + proxy + ingress + handle hops + queueing
    proxy = lat - np.array(ingress_ms)  # (N,) the part outside the ingress replica

    def p(values: np.ndarray, q: int) -> float | None:
        return float(np.percentile(values, q)) if len(values) else None

    return {
        "concurrency": concurrency,
        "requests": len(questions),
        "failures": sum(codes.values()),
        "codes": dict(codes),
        "throughput_rps": len(latencies) / wall,  # answers per second
        "p50_ms": p(lat, 50),
        "p99_ms": p(lat, 99),
        "overhead_ms_p50": p(overhead, 50),
        "proxy_ms_p50": p(proxy, 50),
    }


SERVE_PROCESSES = {
    "ray::ProxyActor": "proxy",
    "bench:Ingress": "ingress",
    "bench:Retriever": "retriever",
    "ray::Shard": "shards",
    "bench:Generator": "generator",
}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds the app's processes have used so far, by part."""
    import psutil

    used = dict.fromkeys(SERVE_PROCESSES.values(), 0.0)
    for process in psutil.process_iter(["cmdline", "cpu_times"]):
        line, times = " ".join(process.info["cmdline"] or []), process.info["cpu_times"]
        for needle, part in SERVE_PROCESSES.items():
            if needle in line and times is not None:
                used[part] += times.user + times.system
    return used


def run_levels(url: str, questions: list[str], levels: list[int], body: dict, tag: str) -> list[dict]:
    asyncio.run(load(url, questions[: max(levels)], max(levels), body))  # warm-up: one each
    results = []
    for level in levels:
        before = cpu_seconds()
        result = asyncio.run(load(url, questions, level, body))
        cpu = {
            part: round((used - before[part]) * 1000 / len(questions), 1)
            for part, used in cpu_seconds().items()
        }
        results.append({"batching": tag, **result, "cpu_ms_per_answer": cpu})
        print(json.dumps(results[-1]), flush=True)
    return results


floor_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Echo:
    async def __call__(self, value: dict) -> dict:
        return value


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(floor_api)
class FloorIngress:
    """The app's request shape with no work in it: proxy → Ingress → two by-value handle hops."""

    def __init__(self, first: serve.handle.DeploymentHandle, second: serve.handle.DeploymentHandle):
        self.first = first.options(_by_reference=False)
        self.second = second.options(_by_reference=False)

    @floor_api.post("/v1/answer")
    async def answer(self, request: Request) -> dict:
        return await self.second.remote(await self.first.remote(await request.json()))


def floor_ms_p50(url: str, questions: list[str], body: dict) -> float:
    """p50 latency of FloorIngress at concurrency 1 (deploy it first)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        latencies = []
        for question in questions:
            start = time.perf_counter()
            client.post("/v1/answer", json={**body, "question": question}).raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(latencies[len(latencies) // 10 :], 50))  # first 10 %: warm-up


def generator_batching_ceiling(app_args: dict, passages: list, body: dict, batch: int) -> float:
    """Throughput of one batch of `batch` questions over the same questions one at a time, with
    the app's generator and threads in this process: what batching can win in the model alone."""
    import torch

    from services.rag.config import DecodingConfig
    from services.rag.loading import load_generator_for_inference
    from services.rag.model import generate_answers

    torch.set_num_threads(int(app_args["generator"].get("torch_threads", 1)))
    generator = load_generator_for_inference(app_args["models"]["generator"], "float32")
    k = body["n_docs"]
    questions = [f"What is known about {p.title}?" for p in passages[:batch]]
    titles = [[p.title for p in passages[i : i + k]] for i in range(batch)]
    texts = [[p.text for p in passages[i : i + k]] for i in range(batch)]
    options = DecodingConfig.parse({key: body[key] for key in DECODING_KEYS})

    def seconds(rows: slice) -> float:
        start = time.perf_counter()
        generate_answers(
            generator,
            questions[rows],
            titles[rows],
            texts[rows],
            np.zeros((len(questions[rows]), k), np.float32),
            options,
        )
        return time.perf_counter() - start

    seconds(slice(0, 1))  # warm-up
    alone = sum(seconds(slice(i, i + 1)) for i in range(batch))
    return alone / seconds(slice(0, batch))


def loop_reference(url: str, generator: str, questions: list[str], body: dict) -> dict:
    """The transformers loop and the exact decoding against the app on `questions`: the app's
    answers, passages and doc scores over HTTP one at a time, then the loop's seconds and answers
    on those passages, and how many of the app's answers the exact decoding gives too."""
    from bench.transformers_loop import time_loop

    with httpx.Client(base_url=url, timeout=300) as client:
        served = [
            client.post("/v1/answer", json={**body, "question": q}).raise_for_status().json()
            for q in questions
        ]
    seconds, answers = time_loop(
        generator, questions, [s["docs"] for s in served], body["num_beams"], body["max_new_tokens"]
    )
    agree = [a == s["answer"] for a, s in zip(answers, served, strict=True)]
    exact = exact_answers(generator, questions, served, body)
    return {
        "loop_p50_s": float(np.percentile(seconds, 50)),
        "loop_answers_agree": sum(agree) / len(agree),
        "answers_identical_vs_exact": sum(e == s["answer"] for e, s in zip(exact, served, strict=True)),
        "answers_compared_vs_exact": len(exact),
    }


def exact_answers(generator_name: str, questions: list[str], served: list[dict], body: dict) -> list[str]:
    """The app's request decoded in this process over the passages and doc scores it served, with
    no latency lever (every passage decoded)."""
    import torch

    from services.rag.config import DecodingConfig
    from services.rag.loading import load_generator_for_inference
    from services.rag.model import generate_answers

    torch.set_num_threads(os.cpu_count() or 1)
    generator = load_generator_for_inference(generator_name, "float32")
    options = DecodingConfig.parse({key: body[key] for key in DECODING_KEYS})
    return [
        generate_answers(
            generator,
            [question],
            [[d["title"] for d in s["docs"]]],
            [[d["text"] for d in s["docs"]]],
            np.array([[d["score"] for d in s["docs"]]], np.float32),
            options,
            drop_mass=0.0,
        )[0]
        for question, s in zip(questions, served, strict=True)
    ]


def stream_reference(url: str, questions: list[str], body: dict) -> dict:
    """The default streamed chat request at concurrency 1: seconds to its first content chunk, and
    whether the streamed text equals the plain answer of the same request with the streaming
    decoding (services/serving/api.py: STREAM_DEFAULTS)."""
    from services.serving.api import STREAM_DEFAULTS

    firsts, equal = [], []
    with httpx.Client(base_url=url, timeout=300) as client:
        for question in questions:
            chat = {"messages": [{"role": "user", "content": question}], "n_docs": body["n_docs"]}
            chat["max_tokens"] = body["max_new_tokens"]
            start, first, pieces = time.perf_counter(), None, []
            with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as response:
                for line in response.iter_lines():
                    delta = json.loads(line[6:])["choices"][0]["delta"] if line.startswith("data: {") else {}
                    if delta.get("content"):
                        first = first or time.perf_counter() - start
                        pieces.append(delta["content"])
            plain = client.post("/v1/chat/completions", json={**chat, **STREAM_DEFAULTS}).json()
            equal.append("".join(pieces) == plain["choices"][0]["message"]["content"])
            firsts.append(first if first is not None else float("nan"))
    return {"first_chunk_p50_s_c1": float(np.percentile(firsts, 50)), "stream_equals_answer": all(equal)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    import ray

    from services.serving.serve_file import read_serve_file

    args = parse_args(argv)
    config = read_serve_file(args.config)
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        num_cpus=max(4, os.cpu_count() or 1),
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = {
        "n_docs": args.n_docs,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "mode": "sequence",
        "decoding": "fast",
    }
    figures: dict = {"models": "default" if args.default_models else "tiny", "requests": args.requests}
    try:
        run_bench(args, config, body, url, port, figures)
    except Exception:  # the figures so far still go out, with what stopped the run
        figures["error"] = traceback.format_exc(limit=3).strip().splitlines()[-1]
        traceback.print_exc()
    print(json.dumps(figures))
    return 0 if "error" not in figures else 1


def run_bench(args: argparse.Namespace, config, body: dict, url: str, port: int, figures: dict) -> None:
    """Every figure into `figures` as it is measured: levels with batching on and off, the
    references, the streams."""
    with tempfile.TemporaryDirectory(prefix="rayrag-bench-") as tmp:
        app_args, passages = build_index_and_models(args, Path(tmp), config.app_args)
        pool = question_pool(args, passages)
        questions = [pool[i % len(pool)] for i in range(args.requests)]
        top = max(args.levels)
        ceiling_batch = args.ceiling_batch if args.ceiling_batch is not None else top
        if args.default_models and args.ceiling_batch is None:
            ceiling_batch = min(top, 4)
        if ceiling_batch:
            figures[f"generator_batching_ceiling_b{ceiling_batch}"] = generator_batching_ceiling(
                app_args, passages, body, ceiling_batch
            )
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            controller_options=config.controller_options or None,
        )
        try:
            deploy(app_args, batching=True)
            on = run_levels(url, questions, args.levels, body, "on")
            figures.update(level_figures(on, args.levels))
            if args.stream_questions:
                figures.update(stream_reference(url, pool[: args.stream_questions], body))
            if args.loop_questions:
                loop = loop_reference(url, app_args["models"]["generator"], pool[: args.loop_questions], body)
                c1_s = figures.get("answer_p50_s_c1")
                figures.update({**loop, "loop_speedup": loop["loop_p50_s"] / c1_s if c1_s else None})
            deploy(app_args, batching=False)
            off = run_levels(url, questions, [top], body, "off")
            serve.run(FloorIngress.bind(Echo.bind(), Echo.bind()), name="bench", route_prefix="/")
            floor = floor_ms_p50(url, questions[:300], body)
        finally:
            serve.shutdown()
    overhead = figures["levels"][0]["overhead_ms_p50"]
    on_top, off_top = figures["levels"][-1]["throughput_rps"], off[0]["throughput_rps"]
    figures.update(
        {
            "overhead_ms_p50": overhead,
            "floor_ms_p50": floor,
            "overhead_over_floor": overhead / floor if overhead is not None else None,
            f"batching_speedup_c{top}": on_top / off_top if off_top else None,
            "levels": on + off,
        }
    )


def level_figures(on: list[dict], levels: list[int]) -> dict:
    """The summary keys of the levels with batching on."""
    by_level = {r["concurrency"]: r for r in on}
    c1_ms = by_level.get(1, {}).get("p50_ms")
    return {
        "levels": on,
        "p99_ms_c8": by_level.get(8, {}).get("p99_ms"),
        "answer_p50_s_c1": c1_ms / 1000 if c1_ms is not None else None,
        "answers_per_s_c8": by_level.get(8, {}).get("throughput_rps"),
        "answers_per_s_c16": by_level.get(16, {}).get("throughput_rps"),
        "failed_c8": by_level.get(8, {}).get("failures"),
        "failed_c16": by_level.get(16, {}).get("failures"),
        "codes": {str(level): by_level[level]["codes"] for level in levels},
    }


if __name__ == "__main__":
    sys.exit(main())
