"""Retrieval benchmark: one in-process IndexFlatIP against the Ray shard group (S = 2, 4).

Prints QPS per batch size, speedups, a memory-bandwidth floor, the fan-out + merge overhead,
what a second co-located replica adds in memory, and the FAISS/BLAS settings both sides ran
with. The last line is one JSON object.

    python bench/retrieval.py --n 1000000 --dim 384
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import faiss
import numpy as np
import ray
from threadpoolctl import threadpool_info

from bench.shard_memory import measured_shards
from cluster.index_build import build_index_from_vectors
from cluster.index_store import load_manifest, version_dir
from cluster.passages import Passage
from cluster.shard import SearchConfig
from cluster.shard_group import ShardGroup, ShardGroupConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shards", default="2,4")
    parser.add_argument("--batch-sizes", default="1,16,64,256")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per (side, batch size)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS threads of the baseline")
    parser.add_argument("--shard-threads", type=int, default=1, help="FAISS threads per shard actor")
    parser.add_argument(
        "--blas-threshold",
        type=int,
        default=20,
        help="faiss.cvar.distance_compute_blas_threshold on both sides",
    )
    parser.add_argument("--root", default=None, help="index root (default: a temporary directory)")
    return parser.parse_args()


def random_unit_vectors(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)  # (N, d)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)  # (c, d)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def blas_settings() -> dict:
    """FAISS threads, BLAS threshold, and the core type the BLAS libraries detected."""
    return {
        "faiss_threads": faiss.omp_get_max_threads(),
        "blas_threshold": int(faiss.cvar.distance_compute_blas_threshold),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset: auto-detect)"),
        "blas": [
            f"{i['filepath'].split('/')[-1]}: {i.get('architecture')} x{i['num_threads']}"
            for i in threadpool_info()
            if i["user_api"] == "blas"
        ],
    }


@ray.remote(num_cpus=0)
def remote_blas_settings(blas_threshold: int, threads: int) -> dict:
    """The same report from inside a Ray worker (where the shard actors run)."""
    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = blas_threshold
    return blas_settings()


def memory_bandwidth(vectors: np.ndarray) -> float:
    """Bytes per second of a single-threaded streaming read (a sum) over the vectors."""
    vectors.sum(dtype=np.float64)
    start = time.perf_counter()
    vectors.sum(dtype=np.float64)
    return vectors.nbytes / (time.perf_counter() - start)


def timed(search, queries: np.ndarray, batch: int, repeats: int) -> tuple[float, list, object]:
    """(QPS, per-call results, first result) of `search` over `repeats` batches of `batch` queries."""
    first = search(queries[:batch])  # warm-up, and the result compared for equality
    results, start = [], time.perf_counter()
    for r in range(repeats):
        rows = np.roll(queries, -r * batch, axis=0)[:batch]  # (b, d)
        results.append(search(rows))
    return batch * repeats / (time.perf_counter() - start), results, first


def bench_flat(
    vectors: np.ndarray, queries: np.ndarray, args: argparse.Namespace, batches: list[int]
) -> dict:
    """Single-process IndexFlatIP with 1 and with --threads FAISS threads; the faster one is the baseline."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    out = {}
    for batch in batches:
        runs = {}
        for threads in sorted({1, args.threads}):
            faiss.omp_set_num_threads(threads)
            qps, _, (_, ids) = timed(lambda q: index.search(q, args.k), queries, batch, args.repeats)
            runs[threads] = {"qps": qps, "ids": ids}
        best = max(runs, key=lambda t: runs[t]["qps"])
        out[batch] = {
            "qps": runs[best]["qps"],
            "ids": runs[best]["ids"],
            "threads": best,
            "qps_by_threads": {t: r["qps"] for t, r in runs.items()},
        }
    index.reset()  # free the vectors before the sharded runs
    return out


def bench_group(
    root: str, version: str, queries: np.ndarray, args: argparse.Namespace, batches: list[int]
) -> dict:
    config = ShardGroupConfig(
        index_root=root,
        search=SearchConfig(
            faiss_threads=args.shard_threads, blas_threshold=args.blas_threshold, verify_checksums=False
        ),
        call_timeout_s=600,
    )
    group = ShardGroup(config, version=version)
    out = {}
    try:
        for batch in batches:
            qps, results, first = timed(lambda q: group.search(q, args.k), queries, batch, args.repeats)
            overhead = [r.timings["total_ms"] - r.timings["max_shard_ms"] for r in results]
            out[batch] = {"qps": qps, "ids": first.ids, "overhead_ms": overhead}
    finally:
        group.close()
    return out


def replica_memory(root: str, version: str, queries: np.ndarray, args: argparse.Namespace) -> dict:
    """Memory of two co-located replicas of shard 0 once both have scanned their whole index."""
    config = ShardGroupConfig(
        index_root=root,
        replicas=2,
        search=SearchConfig(
            faiss_threads=args.shard_threads, blas_threshold=args.blas_threshold, verify_checksums=False
        ),
        call_timeout_s=600,
    )
    with measured_shards():
        group = ShardGroup(config, version=version)
    try:
        replicas = group.replica_handles()[0]
        ray.get([r.search.remote(queries[:4], args.k) for r in replicas])  # flat search touches every page
        first, second = ray.get([r.memory.remote() for r in replicas])
    finally:
        group.close()
    directory = version_dir(root, version)
    index_bytes = sum(
        (directory / name).stat().st_size for name in load_manifest(root, version).shards[0].files.values()
    )
    added = second["Uss"] - second["uss_at_start"]
    return {
        "shard_files_mb": index_bytes / 2**20,
        "second_replica_added_uss_mb": added / 2**20,
        "second_replica_rss_mb": second["Rss"] / 2**20,
        "second_replica_pss_mb": second["Pss"] / 2**20,
        "first_replica_pss_mb": first["Pss"] / 2**20,
        "fraction": added / index_bytes,
    }


def passages(n: int) -> list[Passage]:
    return [Passage(id=i, title="", text=f"passage {i}") for i in range(n)]


def report(flat: dict, groups: dict, batches: list[int], bandwidth: float, nbytes: int) -> None:
    print(
        "baseline QPS by FAISS threads:",
        {b: {t: round(q, 1) for t, q in flat[b]["qps_by_threads"].items()} for b in batches},
    )
    print(
        f"memory bandwidth (1 thread, streaming read): {bandwidth / 1e9:.1f} GB/s; "
        f"scan floor per batch: {nbytes / bandwidth * 1e3:.1f} ms ({nbytes / 2**20:.0f} MiB)"
    )
    print(
        f"{'batch':>6} {'flat qps':>10} {'(thr)':>5} "
        + " ".join(f"{f'S={s} qps':>10} {'ratio':>6} {'ovh p50':>8} {'p99 ms':>7}" for s in groups)
    )
    for batch in batches:
        cells = []
        for result in groups.values():
            overhead = result[batch]["overhead_ms"]
            cells.append(
                f"{result[batch]['qps']:10.1f} {result[batch]['qps'] / flat[batch]['qps']:6.2f} "
                f"{np.percentile(overhead, 50):8.2f} {np.percentile(overhead, 99):7.2f}"
            )
        floor_qps = batch * bandwidth / nbytes
        print(
            f"{batch:6d} {flat[batch]['qps']:10.1f} {flat[batch]['threads']:5d} "
            + " ".join(cells)
            + f"   (1-thread floor {floor_qps:.1f} qps)"
        )


def main() -> None:
    args = parse_args()
    shard_counts = [int(s) for s in args.shards.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    faiss.omp_set_num_threads(args.threads)
    faiss.cvar.distance_compute_blas_threshold = args.blas_threshold
    root = args.root or tempfile.mkdtemp(prefix="rayrag-bench-")
    ray.init(
        num_cpus=max(8, 2 * max(shard_counts)),
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=512 * 2**20,
    )
    try:
        vectors = random_unit_vectors(args.n, args.dim, seed=0)  # (N, d)
        queries = random_unit_vectors(max(batches), args.dim, seed=1)  # (B, d)
        start = time.perf_counter()
        versions = {
            s: build_index_from_vectors(vectors, passages(args.n), root, shards=s) for s in shard_counts
        }
        print(
            f"built {len(versions)} Flat versions of {args.n} x {args.dim} "
            f"in {time.perf_counter() - start:.0f} s"
        )
        print("driver :", json.dumps(blas_settings()))
        print(
            "workers:",
            json.dumps(ray.get(remote_blas_settings.remote(args.blas_threshold, args.shard_threads))),
        )
        print(
            f"baseline FAISS threads 1 and {args.threads} (the faster is the baseline); "
            f"shard actors {args.shard_threads} thread(s) each; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        bandwidth = memory_bandwidth(vectors)
        flat = bench_flat(vectors, queries, args, batches)
        del vectors
        groups = {s: bench_group(root, versions[s], queries, args, batches) for s in shard_counts}
        memory = replica_memory(root, versions[shard_counts[0]], queries, args)
        report(flat, groups, batches, bandwidth, args.n * args.dim * 4)
        print("second replica:", json.dumps({k: round(v, 3) for k, v in memory.items()}))
        two = groups.get(2, groups[shard_counts[0]])
        summary = {
            "n": args.n,
            "dim": args.dim,
            "k": args.k,
            "cores": os.cpu_count(),
            "speedup_b1": two[1]["qps"] / flat[1]["qps"] if 1 in batches else None,
            "speedup_b256": two[256]["qps"] / flat[256]["qps"] if 256 in batches else None,
            "speedup": {
                s: {b: round(g[b]["qps"] / flat[b]["qps"], 3) for b in batches} for s, g in groups.items()
            },
            "merge_overhead_ms_p50": float(np.percentile(two[batches[0]]["overhead_ms"], 50)),
            "merge_overhead_ms_p99": float(np.percentile(two[batches[0]]["overhead_ms"], 99)),
            "ids_equal": all(
                np.array_equal(g[b]["ids"], flat[b]["ids"]) for g in groups.values() for b in batches
            ),
            "second_replica_mem_fraction": memory["fraction"],
            "blas_threshold": args.blas_threshold,
            "baseline_threads": {b: flat[b]["threads"] for b in batches},
            "load_average": os.getloadavg()[0],
        }
        print(json.dumps(summary))
    finally:
        ray.shutdown()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
