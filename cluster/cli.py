"""`rayrag index …` subcommands: build an index version over a corpus, list an index root's versions."""

from __future__ import annotations

import argparse
import json
import math

from cluster.runtime import init_ray


def run_build(args: argparse.Namespace) -> int:
    from cluster.passages import iter_corpus
    from cluster.stream_build import StreamBuildConfig, stream_build

    config = StreamBuildConfig(
        index_root=args.index_root,
        shards=args.shards,
        index_type=args.index_type,
        encoder=args.encoder,
        max_worker_memory=args.max_worker_memory,
        work_dir=args.work_dir,
        batch_size=args.batch_size,
        encoders=args.encoders,
        encoder_threads=args.encoder_threads,
        encoder_cpus=args.encoder_cpus,
        publish=not args.no_publish,
    )
    iter_corpus(args.corpus, args.limit)  # a bad corpus or limit fails before Ray starts
    init_ray(args.ray_address)
    report = stream_build(lambda: iter_corpus(args.corpus, args.limit), config)
    print(
        f"built {report.version} under {args.index_root}: {report.plan.count} passages, "
        f"{args.shards} shards, index type {args.index_type!r}, recall@10 vs exact {report.recall_at_10:.3f} "
        f"± {report.recall_ci95:.3f}{'' if args.no_publish else ' (published)'}"
    )
    pin = f" --index-version {report.version}" if args.no_publish else ""
    print(
        f"serve it with: rayrag serve --index-root {args.index_root}{pin} "
        f"(replicas per shard: index.replicas in deploy.yaml)"
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    from cluster.index_store import check_index_root, list_versions, load_manifest, published_version

    check_index_root(args.index_root)
    published = published_version(args.index_root)
    for version in list_versions(args.index_root):
        manifest = load_manifest(args.index_root, version)
        row = {
            "version": version,
            "published": version == published,
            "count": manifest.count,
            "shards": len(manifest.shards),
            "index_type": manifest.index_type,
            "dim": manifest.dim,
            "encoder": manifest.encoder,
            "encoder_fingerprint": manifest.encoder_fingerprint,
        }
        print(json.dumps(row))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _cpus(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number ≥ 0, got {text}")
    return value


def register(subcommands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands; each sets `run(args) -> int`."""
    index = subcommands.add_parser("index", help="build and inspect sharded FAISS index versions")
    actions = index.add_subparsers(dest="index_command", required=True)
    build = actions.add_parser("build", help="encode a corpus on Ray and write a new index version")
    build.add_argument("--corpus", default="default", help="default | squad-open | PATH.jsonl | PATH.json")
    build.add_argument("--shards", type=_positive, default=1)
    build.add_argument(
        "--index-type", default="Flat", help='FAISS factory string: "Flat", "HNSW32", "IVF4096,PQ64"'
    )
    build.add_argument("--index-root", required=True, help="INDEX_ROOT (versions go in INDEX_ROOT/v000N)")
    build.add_argument("--encoder", default="default", help="document encoder name or path")
    build.add_argument(
        "--encoders", type=_positive, default=None, help="encoder actors on Ray (default: one per free CPU)"
    )
    build.add_argument(
        "--encoder-threads",
        type=_positive,
        default=None,
        help="torch threads per encoder actor (default: Ray's free CPUs / encoders)",
    )
    build.add_argument(
        "--encoder-cpus",
        type=_cpus,
        default=None,
        help="CPUs each encoder actor reserves on Ray, fractions allowed (default: its threads)",
    )
    build.add_argument("--batch-size", type=_positive, default=16, help="passages per encoder forward pass")
    build.add_argument("--limit", type=_positive, default=None, help="keep the first N passages")
    build.add_argument("--no-publish", action="store_true", help="write the version without publishing it")
    build.add_argument(
        "--max-worker-memory",
        default="4GiB",
        help="memory budget of one build worker, e.g. 4GiB: chunk sizes follow; a plan over it is refused",
    )
    build.add_argument(
        "--work-dir",
        default=None,
        help="where a build keeps its resumable steps (default INDEX_ROOT/.build-ID)",
    )
    build.add_argument("--ray-address", default=None, help="join this Ray cluster instead of a local one")
    build.set_defaults(run=run_build)
    listing = actions.add_parser("list", help="list an index root's versions and the published one")
    listing.add_argument("--index-root", required=True, help="INDEX_ROOT to list")
    listing.set_defaults(run=run_list)
