"""Scale benchmark of the streaming build and the served shards, on synthetic Gaussian-mixture vectors.

Runs, in one Ray on this machine: a build at N/4 (the memory reference), a full build at N, a build
at N killed after half its chunks and resumed (checked byte-identical to the full one), then serves
the full build through a shard group. The last line is one JSON object.

    python bench/scale.py --n 2000000 --dim 384
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shard_memory import measured_shards  # noqa: E402
from cluster.index_store import load_manifest, published_version, version_dir  # noqa: E402
from cluster.shard import SearchConfig  # noqa: E402
from cluster.shard_group import ShardGroup, ShardGroupConfig  # noqa: E402
from cluster.stream_build import BuildReport, StreamBuildConfig, stream_build  # noqa: E402
from cluster.synthetic import MixtureEncoder, synthetic_passages  # noqa: E402


class Killed(Exception):
    """Raised by the step hook to stop a build as a crash would."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--index-type", default="IVF1024,PQ48x4fs,RFlat")
    parser.add_argument("--max-worker-memory", default="2GiB")
    parser.add_argument("--queries", type=int, default=300, help="single-query searches timed")
    parser.add_argument("--root", default=None, help="where the index roots go (default: a temp dir)")
    parser.add_argument(
        "--serve-only", action="store_true", help="only serve ROOT/full (built by a run before)"
    )
    return parser.parse_args()


def build(args: argparse.Namespace, root: Path, n: int, shards: int, hook=None) -> tuple[BuildReport, float]:
    config = StreamBuildConfig(
        index_root=str(root),
        shards=shards,
        index_type=args.index_type,
        encoder=f"synthetic:dim={args.dim},clusters=1024,spread=0.5,seed=0",
        max_worker_memory=args.max_worker_memory,
        show_progress=False,
    )
    began = time.perf_counter()
    report = stream_build(lambda: synthetic_passages(n), config, on_step=hook)
    return report, time.perf_counter() - began


def killed_and_resumed(args: argparse.Namespace, root: Path, full: BuildReport, full_s: float) -> dict:
    """Kill a build after half its chunks, resume it; resumed time over the time the full build spent
    on the same remaining work (its total less the encoding share of the chunks already done)."""
    chunks = -(-args.n // full.plan.chunk_rows)
    stop = f"chunk-{chunks // 2 - 1:06d}"

    def hook(step: str) -> None:
        if step == stop:
            raise Killed(step)

    try:
        build(args, root, args.n, args.shards, hook)
    except Killed:
        pass
    resumed, resumed_s = build(args, root, args.n, args.shards)
    remaining = full_s - full.seconds["encode"] * resumed.chunks_reused / chunks
    same = [s.sha256 for s in load_manifest(root, resumed.version).shards] == [
        s.sha256 for s in load_manifest(Path(args.root_full), full.version).shards
    ]
    return {
        "resume_cost_ratio": resumed_s / remaining,
        "chunks_reused": resumed.chunks_reused,
        "chunks": chunks,
        "identical_files": same,
    }


def serve(args: argparse.Namespace, root: Path, version: str) -> dict:
    """QPS and p99 through a shard group; private memory of each shard actor over its file bytes."""
    queries = MixtureEncoder(args.dim, clusters=1024, spread=0.5, seed=0).queries(
        max(64 * 10, args.queries), 9
    )
    # One replica per shard, all on this node: each may reserve only its share of Ray's CPUs (the
    # default, one CPU each, leaves shards past the CPU count unplaced until start_timeout_s).
    shard_cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / args.shards)
    config = ShardGroupConfig(
        index_root=str(root),
        search=SearchConfig(verify_checksums=False),
        call_timeout_s=600,
        shard_cpus=shard_cpus,
    )
    with measured_shards():  # replicas that report their memory
        group = ShardGroup(config, version)
    try:
        group.search(queries[:8], 10)  # warm
        single = []
        for row in queries[: args.queries]:
            began = time.perf_counter()
            group.search(row[None], 10)
            single.append(time.perf_counter() - began)
        began = time.perf_counter()
        for start in range(0, 640, 64):
            group.search(queries[start : start + 64], 10)
        qps_b64 = 640 / (time.perf_counter() - began)
        memory = ray.get([replicas[0].memory.remote() for replicas in group.replica_handles()])
    finally:
        group.close()
    directory, manifest = version_dir(root, version), load_manifest(root, version)
    files = [sum((directory / name).stat().st_size for name in s.files.values()) for s in manifest.shards]
    private = [m["Uss"] - m["uss_at_start"] for m in memory]
    return {
        "qps_b1": len(single) / sum(single),
        "qps_b64": qps_b64,
        "p99_ms_b1": float(np.percentile(single, 99) * 1e3),
        "serve_rss_per_shard_fraction": float(np.mean([p / f for p, f in zip(private, files)])),
        "bytes_per_vector": sum(files) / manifest.count,
    }


def attempt(errors: dict[str, str], step: str, run: Callable[[], dict]) -> dict:
    """`run()`, or {} with the error kept under `step`: a failed step leaves its figures null."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001 (reported in the JSON line, the other steps still run)
        errors[step] = f"{type(error).__name__}: {error}"
        print(f"{step} failed: {errors[step]}", file=sys.stderr, flush=True)
        return {}


def build_figures(args: argparse.Namespace, base: Path, errors: dict[str, str]) -> dict:
    """The N/4 and N builds and the killed-and-resumed one; whatever could not be measured is absent."""
    small = attempt(
        errors,
        "build_n_over_4",
        lambda: {"report": build(args, base / "quarter", args.n // 4, max(1, args.shards // 4))[0]},
    ).get("report")
    if small is not None:
        print("N/4 build:", small.seconds, small.peak_private, flush=True)
    full = attempt(
        errors,
        "build_n",
        lambda: dict(zip(("report", "seconds"), build(args, base / "full", args.n, args.shards))),
    )
    if not full:
        return {}
    report, full_s = full["report"], full["seconds"]
    print("N build:", round(full_s, 1), "s", report.seconds, report.peak_private, flush=True)
    resume = attempt(errors, "resume", lambda: killed_and_resumed(args, base / "resumed", report, full_s))
    print("resume:", resume, flush=True)
    peak = max(report.peak_private.values())
    return {
        "version": report.version,
        "build_vectors_per_s": args.n / full_s,
        "build_s": full_s,
        **{f"{step}_s": report.seconds.get(step) for step in ("encode", "train", "add", "verify", "bm25")},
        "peak_rss_build_worker_mb": peak / 2**20,
        "peak_rss_by_worker_mb": {k: round(v / 2**20, 1) for k, v in report.peak_private.items()},
        "peak_rss_ratio_4n_vs_n": peak / max(small.peak_private.values()) if small else None,
        "recall_at_10": report.recall_at_10,
        "recall_ci95": report.recall_ci95,
        **{k: resume.get(k) for k in ("resume_cost_ratio", "identical_files")},
    }


FIGURES = (
    "build_vectors_per_s", "build_s", "encode_s", "train_s", "add_s", "verify_s", "bm25_s",
    "peak_rss_build_worker_mb", "peak_rss_by_worker_mb", "peak_rss_ratio_4n_vs_n", "recall_at_10",
    "recall_ci95", "resume_cost_ratio", "identical_files", "qps_b1", "qps_b64", "p99_ms_b1",
    "serve_rss_per_shard_fraction", "bytes_per_vector",
)  # fmt: skip


def main() -> None:
    args = parse_args()
    base = Path(args.root or tempfile.mkdtemp(prefix="rayrag-scale-"))
    args.root_full = str(base / "full")
    errors: dict[str, str] = {}
    figures: dict = {}
    ray.init(
        num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False
    )
    try:
        if args.serve_only:
            version = published_version(base / "full")
        else:
            figures = build_figures(args, base, errors)
            version = figures.pop("version", None)
        if version is not None:
            figures |= attempt(errors, "serve", lambda: serve(args, base / "full", version))
    finally:
        ray.shutdown()
    head = {"n": args.n, "dim": args.dim, "index_type": args.index_type, "shards": args.shards, "nodes": 1}
    line = head | {"max_worker_memory": args.max_worker_memory} | {k: figures.get(k) for k in FIGURES}
    print(json.dumps(line | {"errors": errors}))


if __name__ == "__main__":
    main()
