"""The Ray side of a streaming build: the encoder pool that writes chunk files, the training task,
one add task per shard placed round-robin over the nodes, the recall check, and the commit."""

from __future__ import annotations

import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster import storage
from cluster.bm25 import add_to_entries as add_bm25
from cluster.build_plan import WORKER_BASE, BuildPlan
from cluster.build_work import (
    WorkDir,
    gather_rows,
    node_id,
    peak_private_bytes,
    pieces,
    read_npy,
    read_passages,
    reset_peak_memory,
    sample_rows,
)
from cluster.encode_pool import EncoderPlan, EncoderWorker, _wait_until_placed, plan_encoders
from cluster.index_build import (
    METRIC,
    _stores_exact_vectors,
    default_search_params,
    make_faiss_index,
    shard_bounds,
)
from cluster.index_store import Manifest, ShardManifest, commit_version, sha256_file, staging_dir
from cluster.index_store import publish as publish_version
from cluster.merge import merge_topk
from cluster.passages import Passage, passage_text
from cluster.shard import PassageTable, apply_search_params

if TYPE_CHECKING:
    from cluster.stream_build import BuildReport, StepHook, StreamBuildConfig

TRAIN_SEED, QUERY_SEED, K = 1234, 4321, 10
IN_FLIGHT_PER_ACTOR = 2  # chunks queued per encoder actor: one encoding, one waiting


class EncoderPool:
    """Encoder actors that write chunk files; at most IN_FLIGHT_PER_ACTOR chunks each in flight."""

    def __init__(self, config: StreamBuildConfig, count: int) -> None:
        self.config, self.count = config, count
        self.workers: list = []
        self.running: dict = {}
        self.plan = EncoderPlan(1, 1, 1.0)

    def start(self) -> tuple[str, int, str]:
        """Place and load the actors; returns the encoder's (name, dim, fingerprint)."""
        cfg = self.config
        free = ray.available_resources().get("CPU", 0.0)
        self.plan = plan_encoders(
            free, -(-self.count // 256), cfg.encoders, cfg.encoder_threads, cfg.encoder_cpus
        )
        actor = ray.remote(EncoderWorker).options(num_cpus=self.plan.cpus)
        self.workers = [actor.remote(self.plan.threads) for _ in range(self.plan.actors)]
        _wait_until_placed(self.workers, self.plan)
        infos = ray.get([worker.load.remote(cfg.encoder, None) for worker in self.workers])
        self.slots = deque(self.workers * IN_FLIGHT_PER_ACTOR)
        return infos[0]

    def submit(self, work: str, chunk: int, rows: list[Passage]) -> list[tuple[int, dict]]:
        """Send one chunk; first wait for a free slot. Returns the chunks that finished meanwhile."""
        finished = [] if self.slots else [self._wait_one()]
        worker = self.slots.popleft()
        ids, titles, texts = [p.id for p in rows], [p.title for p in rows], [p.text for p in rows]
        ref = worker.write_chunk.remote(work, chunk, ids, titles, texts, self.config.batch_size)
        self.running[ref] = (worker, chunk)
        return finished

    def _wait_one(self) -> tuple[int, dict]:
        [ref], _ = ray.wait(list(self.running), num_returns=1)
        worker, chunk = self.running.pop(ref)
        self.slots.append(worker)
        return chunk, ray.get(ref)

    def drain(self) -> list[tuple[int, dict]]:
        return [self._wait_one() for _ in range(len(self.running))]

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)


def _placement(index: int) -> NodeAffinitySchedulingStrategy:
    """Task `index` goes to the index-th alive node (round-robin), elsewhere if that node is gone."""
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
    return NodeAffinitySchedulingStrategy(nodes[index % len(nodes)], soft=True)


def _template(work: WorkDir, plan: BuildPlan) -> faiss.Index:
    if plan.train_rows:
        return faiss.deserialize_index(np.frombuffer(storage.read_bytes(work.template()), np.uint8))
    return make_faiss_index(plan.index_type, plan.dim)


def train_template(location: str, plan: BuildPlan) -> dict:
    """Train the one index template on a seeded sample of the chunk files and store it."""
    reset_peak_memory()
    began, work = time.monotonic(), WorkDir(location)
    sample = gather_rows(work, plan.chunk_rows, sample_rows(plan.count, plan.train_rows, TRAIN_SEED))
    index = make_faiss_index(plan.index_type, plan.dim)
    index.train(sample)
    storage.write_bytes(work.template(), faiss.serialize_index(index).tobytes())
    return {"rows": len(sample), "seconds": time.monotonic() - began, "peak_private": peak_private_bytes()}


def _add_blocks(
    work: WorkDir, plan: BuildPlan, index: faiss.Index, bounds: tuple[int, int], folder: Path, shard: int
):
    """Add the shard's rows one chunk piece at a time; write passages (and vectors when the index
    cannot give them back exactly) beside it. Returns the file roles → names."""
    start, stop = bounds
    files = {
        "ids": f"ids-{shard}.npy",
        "passages": f"passages-{shard}.bin",
        "offsets": f"offsets-{shard}.npy",
    }
    offsets, ids = np.zeros((stop - start, 3), np.int64), np.zeros(stop - start, np.int64)  # (n, 3), (n,)
    stored, row, position = None, 0, 0
    with open(folder / files["passages"], "wb") as blob:
        for chunk, lo, hi in pieces(start, stop, plan.chunk_rows):
            block = np.ascontiguousarray(read_npy(work.chunk_vectors(chunk))[lo:hi])  # (b, d)
            if row == 0 and not _stores_exact_vectors(_probe(index, block), block[:8]):
                files["vectors"] = f"vectors-{shard}.npy"
                stored = np.lib.format.open_memmap(
                    folder / files["vectors"], "w+", np.float32, (stop - start, plan.dim)
                )
            if stored is not None:
                stored[row : row + len(block)] = block
            index.add(block)
            passages = list(islice(read_passages(work, chunk), lo, hi))
            ids[row : row + len(passages)] = [passage_id for passage_id, _, _ in passages]
            row, position = PassageTable.append(
                blob, ((title, text) for _, title, text in passages), offsets, row, position
            )
    if stored is not None:
        stored.flush()
    np.save(folder / files["ids"], ids)
    np.save(folder / files["offsets"], offsets)
    return files


def _probe(index: faiss.Index, block: np.ndarray) -> faiss.Index:
    probe = faiss.clone_index(index)
    probe.add(block[:8])
    return probe


def add_shard(location: str, plan: BuildPlan, shard: int, threads: int) -> dict:
    """Build shard `shard` from the template: add its rows in blocks, upload its files to the work dir."""
    reset_peak_memory()
    began, work = time.monotonic(), WorkDir(location)
    bounds = shard_bounds(plan.count, plan.shards)[shard]
    faiss.omp_set_num_threads(1 if "HNSW" in plan.index_type else threads)  # HNSW adds race otherwise
    index = _template(work, plan)
    with tempfile.TemporaryDirectory(prefix="rayrag-shard-") as tmp:
        folder = Path(tmp)
        files = _add_blocks(work, plan, index, bounds, folder, shard)
        files["index"] = f"shard-{shard}.faiss"
        faiss.write_index(index, str(folder / files["index"]))
        del index
        digests = {name: sha256_file(folder / name) for name in files.values()}
        for name in files.values():
            storage.upload(folder / name, work.shard_file(name))
    entry = ShardManifest(shard, bounds[1] - bounds[0], bounds[0], bounds[1] - 1, files, digests)
    return {
        "entry": asdict(entry),
        "node": node_id(),
        "seconds": time.monotonic() - began,
        "peak_private": peak_private_bytes(),
    }


def _shard_texts(
    work: WorkDir, plan: BuildPlan, bounds: tuple[int, int]
) -> Callable[[], Iterator[list[str]]]:
    """Shard rows [start, stop)'s passage texts, one chunk file's part at a time, in id order."""

    def chunks() -> Iterator[list[str]]:
        for chunk, lo, hi in pieces(*bounds, plan.chunk_rows):
            yield [passage_text(Passage(*row)) for row in islice(read_passages(work, chunk), lo, hi)]

    return chunks


def build_bm25(location: str, plan: BuildPlan, entries: list[dict]) -> dict:
    """BM25 over the chunk files' passages, streamed shard by shard; its files go to the work dir beside
    the shards'. Returns the manifest's BM25 description and the entries with the BM25 files added."""
    reset_peak_memory()
    began, work = time.monotonic(), WorkDir(location)
    texts = [_shard_texts(work, plan, bounds) for bounds in shard_bounds(plan.count, plan.shards)]
    with tempfile.TemporaryDirectory(prefix="rayrag-bm25-") as tmp:
        described, shards = add_bm25(Path(tmp), texts, [ShardManifest(**entry) for entry in entries])
        for entry, shard in zip(entries, shards):
            for name in set(shard.files.values()) - set(entry["files"].values()):
                storage.upload(Path(tmp) / name, work.shard_file(name))
    return {
        "bm25": described,
        "entries": [asdict(shard) for shard in shards],
        "seconds": time.monotonic() - began,
        "peak_private": peak_private_bytes(),
    }


def search_shard(location: str, entry: dict, params: dict, queries: np.ndarray, k: int) -> tuple:
    """(scores, global ids), each (B, k), of one built shard in the work dir."""
    work = WorkDir(location)
    index = faiss.deserialize_index(
        np.frombuffer(storage.read_bytes(work.shard_file(entry["files"]["index"])), np.uint8)
    )
    apply_search_params(index, params)
    ids = read_npy(work.shard_file(entry["files"]["ids"]))  # (n,)
    scores, rows = index.search(queries, min(k, len(ids)))  # (B, k)
    return scores, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)


def exact_topk(work: WorkDir, plan: BuildPlan, queries: np.ndarray, k: int) -> np.ndarray:
    """(B, k) ids of exact inner-product search, streaming over the chunk files."""
    best_scores, best_ids = (
        np.full((len(queries), 0), 0, np.float32),
        np.full((len(queries), 0), -1, np.int64),
    )
    for chunk in range(-(-plan.count // plan.chunk_rows)):
        scores = queries @ read_npy(work.chunk_vectors(chunk)).T  # (B, c)
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]  # (B, k)
        ids = top + chunk * plan.chunk_rows
        best_scores, best_ids, _, _ = merge_topk(
            [best_scores, np.take_along_axis(scores, top, axis=1)], [best_ids, ids], k
        )
    return best_ids


def check_recall(work: WorkDir, plan: BuildPlan, entries: list[dict], params: dict, count: int) -> dict:
    """recall@10 of the sharded index against exact search on `count` sampled corpus vectors."""
    queries = gather_rows(work, plan.chunk_rows, sample_rows(plan.count, count, QUERY_SEED))  # (Q, d)
    exact = exact_topk(work, plan, queries, K)  # (Q, K)
    task = ray.remote(search_shard)
    parts = ray.get(
        [
            task.options(scheduling_strategy=_placement(e["shard"])).remote(
                work.location, e, params, queries, K
            )
            for e in entries
        ]
    )
    _, found, _, _ = merge_topk([p[0] for p in parts], [p[1] for p in parts], K)  # (Q, K)
    hits = np.array([len(np.intersect1d(a, b)) / K for a, b in zip(found, exact)])  # (Q,)
    return {
        "recall_at_10": float(hits.mean()),
        "recall_ci95": float(1.96 * hits.std() / np.sqrt(len(hits))),
        "queries": len(hits),
    }


def _run_step(work: WorkDir, step: str, done: dict, run, on_step: StepHook | None) -> dict:
    if step in done:
        return done[step]
    info = run()
    _record(work, step, info, on_step)
    return info


def _record(work: WorkDir, step: str, info: dict, on_step: StepHook | None) -> None:
    work.record(step, info)
    if on_step is not None:
        on_step(step)


def _add_all(
    config: StreamBuildConfig, work: WorkDir, report: BuildReport, done: dict, on_step
) -> list[dict]:
    """One add task per shard without a marker, placed round-robin over the nodes."""
    plan, task = report.plan, ray.remote(max_calls=1)(add_shard)  # a fresh process: its own peak
    memory = WORKER_BASE + plan.worker_bytes()["add"]
    threads = max(1, int(config.encoder_threads or 1))
    pending = {
        task.options(num_cpus=1, memory=memory, scheduling_strategy=_placement(s)).remote(
            work.location, plan, s, threads
        ): s
        for s in range(plan.shards)
        if f"shard-{s:04d}" not in done
    }
    report.shards_reused = plan.shards - len(pending)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        shard, info = pending.pop(ref), ray.get(ref)
        done[f"shard-{shard:04d}"] = info
        _record(work, f"shard-{shard:04d}", info, on_step)
        report.shards_built += 1
        report.note_peak("add", info["peak_private"])
        report.add_nodes.append(info["node"])
    return [done[f"shard-{s:04d}"]["entry"] for s in range(plan.shards)]


def finish(
    config: StreamBuildConfig, work: WorkDir, report: BuildReport, encoder: tuple[str, str], on_step
) -> None:
    """Train, add, check recall, build BM25 and commit (each step skipped when its marker exists)."""
    plan, done = report.plan, work.done()
    began = time.monotonic()
    if plan.train_rows:
        memory = WORKER_BASE + plan.worker_bytes()["train"]
        remote = ray.remote(max_calls=1)(train_template).options(memory=memory)
        info = _run_step(work, "train", done, lambda: ray.get(remote.remote(work.location, plan)), on_step)
        report.note_peak("train", info["peak_private"])
    report.seconds["train"] = time.monotonic() - began
    began = time.monotonic()
    entries = _add_all(config, work, report, done, on_step)
    report.seconds["add"] = time.monotonic() - began
    began = time.monotonic()
    params = default_search_params(config.index_type)
    checked = _run_step(
        work,
        "verify",
        done,
        lambda: check_recall(work, plan, entries, params, config.recall_queries),
        on_step,
    )
    report.recall_at_10, report.recall_ci95 = checked["recall_at_10"], checked["recall_ci95"]
    report.seconds["verify"] = time.monotonic() - began
    began = time.monotonic()
    remote = ray.remote(max_calls=1)(build_bm25)  # a fresh process: its term table freed at the end
    bm25 = _run_step(
        work, "bm25", done, lambda: ray.get(remote.remote(work.location, plan, entries)), on_step
    )
    report.seconds["bm25"] = time.monotonic() - began
    report.version = commit(config, work, report, bm25, encoder, params)
    if not config.keep_work:
        storage.delete_dir(work.location)


def commit(
    config: StreamBuildConfig,
    work: WorkDir,
    report: BuildReport,
    built: dict,
    encoder: tuple[str, str],
    params: dict,
) -> str:
    """Copy the shard files (`built`: the BM25 step's entries and description) into a staging
    directory, commit it with its manifest, publish it."""
    root = config.index_root
    storage.make_dirs(root)
    staged = staging_dir(root)
    shards = tuple(ShardManifest(**entry) for entry in built["entries"])
    manifest = Manifest(
        version="staged",
        encoder=encoder[0],
        encoder_fingerprint=encoder[1],
        dim=report.plan.dim,
        metric=METRIC,
        index_type=config.index_type,
        count=report.plan.count,
        shards=shards,
        search_params=params,
        bm25=built["bm25"],
        recall_at_10=report.recall_at_10,
        recall_ci95=report.recall_ci95,
        build_fingerprint=report.fingerprint,
    )
    try:
        for shard in shards:
            for name in shard.files.values():
                storage.copy_file(work.shard_file(name), storage.join(str(staged), name))
        version = commit_version(root, staged, manifest)
    except BaseException:
        storage.delete_dir(str(staged))
        raise
    if config.publish:
        publish_version(root, version)
    return version
