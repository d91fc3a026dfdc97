"""Failure under load over HTTP on 127.0.0.1: a shard replica killed, the index swapped, the
Generator autoscaled; failures, coverage, versions and p50/p99 per phase against steady state.

Starts a local Ray and the app as deploy.yaml configures it, with tiny models by default, over two
index versions it builds in a temporary folder (distinct slices of the default corpus, so that each
answer's docs tell its version). Each case holds closed-loop load at `--concurrency` and runs:

- kill: with `index.shard_replicas` 2, then 1, SIGKILL one replica of shard 0 (its pid from
  /healthz) and wait until the group has restarted it. Failed requests; with one replica, answers
  flagged `index_coverage < 1` until the restart, full after it.
- swap: the admin API swaps v0001 → v0002. Failed requests, answers whose docs are not all of the
  version they name, answers (in completion order) older than one answered before them.
- autoscale: the Generator with Serve autoscaling (1 to 2 replicas, short delays); seconds from
  the start of the load to two RUNNING replicas in `serve.status()`, and from its end back to one.

Phases are cut by send time: steady (before the event), event (until the recovery: replica back,
swap call returned), after. The last line printed is one JSON object with every figure.

    python bench/chaos.py                       # tiny models, about two minutes on 2 cores
    python bench/chaos.py --concurrency 8 --steady-requests 300
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for bench.serve and tests.serve_load

from bench.serve import build_index_and_models, deploy  # noqa: E402
from tests.serve_load import (  # noqa: E402
    FAST_AUTOSCALING,
    Load,
    Outcome,
    all_replicas_ready_without,
    kill_shard_replica,
    latency_stats,
    measure_autoscaling,
    mixed_version_answers,
    sent_between,
    start_serve,
    version_regressions,
    wait_until,
)

APP = "bench"  # the application name bench.serve.deploy gives
TOKEN = "chaos-bench-token"
WARMUP = 20  # answers before the steady phase starts
BODY = {"n_docs": 4, "num_beams": 1, "max_new_tokens": 8, "mode": "sequence", "decoding": "fast"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight in every case")
    parser.add_argument("--steady-requests", type=int, default=150, help="answers before each event")
    parser.add_argument("--after-requests", type=int, default=60, help="answers after each recovery")
    parser.add_argument("--scale-concurrency", type=int, default=8, help="requests in flight to autoscale")
    parser.add_argument("--max-requests", type=int, default=5000, help="cap per case")
    parser.add_argument("--timeout-s", type=float, default=120, help="cap on every wait")
    parser.add_argument("--corpus-limit", type=int, default=300, help="passages per index version")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument(
        "--default-models", action="store_true", help="all-MiniLM-L6-v2 + SmolLM2-135M instead of tiny models"
    )
    args = parser.parse_args(argv)
    if min(args.concurrency, args.scale_concurrency, args.steady_requests, args.after_requests) < 1:
        raise SystemExit(f"counts must be ≥ 1, got {vars(args)}")
    return args


def build_versions(args: argparse.Namespace, tmp: Path) -> tuple[dict, list[str], dict[str, set[str]]]:
    """App args over v0001 (published: the first `corpus_limit` passages) and v0002 (the next ones);
    questions about v0001's passages; the passage texts of each version."""
    from cluster.index_build import build_index
    from cluster.index_store import published_version
    from cluster.passages import Passage, load_corpus
    from services.serving.serve_file import read_serve_file

    app_args, first = build_index_and_models(args, tmp, read_serve_file().app_args)
    limit = len(first)
    second = [
        Passage(i, p.title, p.text) for i, p in enumerate(load_corpus("default", limit=2 * limit)[limit:])
    ]
    index, encoder = app_args["index"], app_args["models"]["query_encoder"]
    newer = build_index(
        second, index["root"], encoder=encoder, shards=args.shards, publish=False, show_progress=False
    )
    # Fractional CPUs, so that two Generators and a swap's second set of shard actors fit 2 cores.
    app_args["index"] = {**index, "shard_cpus": 0.1}
    app_args["retriever"] = {**app_args.get("retriever", {}), "num_cpus": 0.25}
    app_args["generator"] = {**app_args["generator"], "num_cpus": 0.25}
    app_args["admin_token"] = TOKEN
    questions = [f"What is known about {p.title}?" for p in first]
    older = published_version(index["root"])
    return app_args, questions, {older: {p.text for p in first}, newer: {p.text for p in second}}


def with_replicas(app_args: dict, replicas: int) -> dict:
    return {**app_args, "index": {**app_args["index"], "shard_replicas": replicas}}


def under_load(
    url: str, args: argparse.Namespace, questions: list[str], event: Callable[[httpx.Client], None]
) -> tuple[list[Outcome], float, float, float]:
    """Warm up, hold steady for `steady_requests`, run `event` (it returns once recovered), then
    `after_requests` more. The outcomes and the times the steady phase, event and recovery began."""
    with httpx.Client(base_url=url, timeout=args.timeout_s) as client:
        with Load(
            url, questions, BODY, args.concurrency, args.max_requests, max_s=10 * args.timeout_s
        ) as load:
            load.wait_for(WARMUP, args.timeout_s)
            steady_at = time.monotonic()
            load.wait_for(WARMUP + args.steady_requests, args.timeout_s)
            event_at = time.monotonic()
            event(client)
            recovered_at = time.monotonic()
            load.wait_for(load.answered() + args.after_requests, args.timeout_s)
            outcomes = load.stop()
    return outcomes, steady_at, event_at, recovered_at


def phases(outcomes: list[Outcome], steady_at: float, event_at: float, recovered_at: float) -> dict:
    """Latency and failures per phase, the event's seconds and its p99 over the steady p99."""
    steady = latency_stats(sent_between(outcomes, steady_at, event_at))
    event = latency_stats(sent_between(outcomes, event_at, recovered_at))
    ratio = event["p99_ms"] / steady["p99_ms"] if event["p99_ms"] and steady["p99_ms"] else None
    return {
        "event_s": recovered_at - event_at,
        "failed": sum(not o.ok for o in outcomes),
        "p99_ratio": ratio,
        "steady": steady,
        "event": event,
        "after": latency_stats(sent_between(outcomes, recovered_at)),
    }


def kill_case(url: str, args: argparse.Namespace, questions: list[str]) -> dict:
    """SIGKILL one replica of shard 0 under load and wait until the shard group has restarted it."""

    def kill(client: httpx.Client) -> None:
        pid = kill_shard_replica(client, shard=0)
        wait_until(
            lambda: all_replicas_ready_without(client, pid), args.timeout_s, "the killed replica restarted"
        )

    outcomes, *times = under_load(url, args, questions, kill)
    coverages = [o.coverage for o in outcomes if o.ok]  # completion order
    return {
        **phases(outcomes, *times),
        "partial_answers": sum(c < 1 for c in coverages),
        "partial_then_full": any(c < 1 for c in coverages) and coverages[-1] == 1.0,
    }


def swap_case(url: str, args: argparse.Namespace, questions: list[str], texts: dict[str, set[str]]) -> dict:
    """Swap to the newer of the two versions in `texts` through the admin API under load."""
    swapped: dict = {}
    newer = max(texts)

    def swap(client: httpx.Client) -> None:
        response = client.post(
            "/v1/admin/index/swap", json={"version": newer}, headers={"authorization": f"Bearer {TOKEN}"}
        )
        response.raise_for_status()
        swapped.update(response.json())

    outcomes, *times = under_load(url, args, questions, swap)
    answered = [o for o in outcomes if o.ok]
    return {
        **phases(outcomes, *times),
        "swap": swapped,
        "answers_per_version": {v: sum(o.version == v for o in answered) for v in sorted(texts)},
        "mixed_version_answers": mixed_version_answers(outcomes, texts),
        "version_regressions": version_regressions(outcomes),
    }


def autoscale_case(url: str, args: argparse.Namespace, questions: list[str]) -> dict:
    scaled = measure_autoscaling(
        APP,
        lambda: Load(url, questions, BODY, args.scale_concurrency, args.max_requests, max_s=args.timeout_s),
        args.timeout_s,
    )
    return {
        "config": FAST_AUTOSCALING,
        **{k: v for k, v in vars(scaled).items() if k != "outcomes"},
        **latency_stats(scaled.outcomes),
    }


def run_cases(url: str, args: argparse.Namespace, tmp: Path) -> dict:
    app_args, questions, texts = build_versions(args, tmp)
    deploy(with_replicas(app_args, 2), batching=True)
    kill_r2 = kill_case(url, args, questions)
    swap = swap_case(url, args, questions, texts)
    deploy(with_replicas(app_args, 1), batching=True)
    kill_r1 = kill_case(url, args, questions)
    autoscaled = {**app_args["generator"], "autoscaling_config": FAST_AUTOSCALING}
    deploy({**with_replicas(app_args, 1), "generator": autoscaled}, batching=True)
    return {
        "kill_r2": kill_r2,
        "swap": swap,
        "kill_r1": kill_r1,
        "autoscale": autoscale_case(url, args, questions),
    }


def main(argv: list[str] | None = None) -> int:
    from ray import serve

    from cluster.runtime import init_ray

    args = parse_args(argv)
    init_ray(log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="rayrag-chaos-") as tmp:
        url = start_serve()
        try:
            cases = run_cases(url, args, Path(tmp))
        finally:
            serve.shutdown()
    for name, case in cases.items():
        print(json.dumps({"case": name, **case}), flush=True)
    print(
        json.dumps(
            {
                "models": "default" if args.default_models else "tiny",
                "concurrency": args.concurrency,
                "failed_kill_r2": cases["kill_r2"]["failed"],
                "failed_kill_r1": cases["kill_r1"]["failed"],
                "partial_then_full_r1": cases["kill_r1"]["partial_then_full"],
                "partial_answers_r1": cases["kill_r1"]["partial_answers"],
                "failed_swap": cases["swap"]["failed"],
                "mixed_version_answers": cases["swap"]["mixed_version_answers"],
                "version_regressions": cases["swap"]["version_regressions"],
                "scale_up_s": cases["autoscale"]["up_s"],
                "scale_down_s": cases["autoscale"]["down_s"],
                "scale_up_decided_s": cases["autoscale"]["up_decided_s"],
                "scale_down_decided_s": cases["autoscale"]["down_decided_s"],
                "p99_ratio_kill_r2": cases["kill_r2"]["p99_ratio"],
                "p99_ratio_kill_r1": cases["kill_r1"]["p99_ratio"],
                "p99_ratio_swap": cases["swap"]["p99_ratio"],
                "p50_p99_ms": {
                    f"{name}_{phase}": [case[phase]["p50_ms"], case[phase]["p99_ms"]]
                    for name, case in cases.items()
                    if name != "autoscale"
                    for phase in ("steady", "event", "after")
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
