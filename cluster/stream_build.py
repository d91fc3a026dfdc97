"""The streaming build: corpus chunks → encoder actors writing chunk files → one trained template →
one add task per shard spread over the nodes → recall checked against exact search → a version.

Every step leaves a marker in the build's work directory once its files are complete, and the work
directory is named by the build's fingerprint, so re-running a killed build skips finished steps.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

from pydantic import Field
from tqdm.auto import tqdm

from cluster import storage
from cluster.build_plan import BuildPlan, fingerprint, parse_bytes, plan_build
from cluster.build_work import WorkDir
from cluster.config import Config
from cluster.index_build import check_index_type, make_faiss_index
from cluster.passages import Passage, passage_text

if TYPE_CHECKING:
    from cluster.stream_tasks import EncoderPool

log = logging.getLogger(__name__)
StepHook = Callable[[str], None]


class StreamBuildConfig(Config):
    """What `rayrag index build` asks of a streaming build."""

    index_root: str
    shards: int = Field(1, ge=1)
    index_type: str = "Flat"
    encoder: str = "default"
    max_worker_memory: str = "4GiB"
    work_dir: str | None = None  # default: INDEX_ROOT/.build-<fingerprint>
    batch_size: int = Field(16, ge=1)
    encoders: int | None = Field(None, ge=1)
    encoder_threads: int | None = Field(None, ge=1)
    encoder_cpus: float | None = Field(None, ge=0)
    recall_queries: int = Field(1000, ge=1)
    publish: bool = True
    keep_work: bool = False  # keep the work directory after the version is committed
    show_progress: bool = True


@dataclass
class BuildReport:
    """What a streaming build did: the version, and per step what ran and what was reused."""

    version: str
    fingerprint: str
    work_dir: str
    plan: BuildPlan
    chunks_encoded: int = 0
    chunks_reused: int = 0
    shards_built: int = 0
    shards_reused: int = 0
    recall_at_10: float = 0.0
    recall_ci95: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    peak_private: dict[str, int] = field(default_factory=dict)  # worker kind → max bytes seen
    add_nodes: list[str] = field(default_factory=list)

    def note_peak(self, kind: str, value: int) -> None:
        self.peak_private[kind] = max(self.peak_private.get(kind, 0), int(value))


def scan_corpus(passages: Iterable[Passage]) -> tuple[int, str]:
    """(count, content hash) in one streaming pass; ValueError naming an empty passage."""
    digest, count = hashlib.sha256(), 0
    for passage in passages:
        if not isinstance(passage.text, str) or not passage.text.strip():
            raise ValueError(f"passage {passage.id} ({passage.title!r}) has no text: {passage.text!r}")
        if passage.id != count:
            raise ValueError(f"passage ids must count up from 0; passage {count} has id {passage.id}")
        digest.update(passage_text(passage).encode("utf-8") + b"\0")
        count += 1
    if not count:
        raise ValueError("cannot build an index over an empty corpus")
    return count, digest.hexdigest()[:16]


def _chunks(passages: Iterable[Passage], rows: int) -> Iterator[list[Passage]]:
    iterator = iter(passages)
    while chunk := list(islice(iterator, rows)):
        yield chunk


def stream_build(
    corpus: Callable[[], Iterable[Passage]], config: StreamBuildConfig, on_step: StepHook | None = None
) -> BuildReport:
    """Build (or resume) a version over `corpus()` (called twice: a counting pass, then the build);
    `on_step(name)` runs after each recorded step."""
    from cluster import stream_tasks

    check_index_type(config.index_type)
    budget = parse_bytes(config.max_worker_memory)
    began = time.monotonic()
    count, corpus_hash = scan_corpus(corpus())
    pool = stream_tasks.EncoderPool(config, count)
    try:
        name, dim, encoder_fp = pool.start()
        make_faiss_index(config.index_type, dim)
        plan = plan_build(count, dim, config.index_type, config.shards, budget)
        report = _report(config, plan, corpus_hash, encoder_fp)
        log.info("build %s: %d passages, work directory %s", report.fingerprint, count, report.work_dir)
        report.seconds["scan_and_start"] = time.monotonic() - began
        _encode(pool, corpus(), WorkDir(report.work_dir), report, config.show_progress, on_step)
    finally:
        pool.close()
    stream_tasks.finish(config, WorkDir(report.work_dir), report, (name, encoder_fp), on_step)
    return report


def _report(config: StreamBuildConfig, plan: BuildPlan, corpus_hash: str, encoder_fp: str) -> BuildReport:
    parts = {
        "corpus": corpus_hash,
        "count": plan.count,
        "encoder": encoder_fp,
        "index_type": config.index_type,
        "shards": plan.shards,
        "chunk_rows": plan.chunk_rows,
        "train_rows": plan.train_rows,
    }
    build = fingerprint(parts)
    work = config.work_dir or storage.join(config.index_root, f".build-{build}")
    return BuildReport(version="", fingerprint=build, work_dir=str(work), plan=plan)


def _encode(
    pool: EncoderPool,
    passages: Iterable[Passage],
    work: WorkDir,
    report: BuildReport,
    show_progress: bool,
    on_step: StepHook | None,
) -> None:
    """Encode every chunk without a marker, with a bounded number in flight; markers as they finish."""
    began, done = time.monotonic(), work.done()
    desc = f"encoding ({pool.plan.actors} encoder actors × {pool.plan.threads} threads)"
    with tqdm(total=report.plan.count, desc=desc, unit="passage", disable=not show_progress) as progress:
        for chunk, rows in enumerate(_chunks(passages, report.plan.chunk_rows)):
            if f"chunk-{chunk:06d}" in done:
                report.chunks_reused += 1
                progress.update(len(rows))
                continue
            for finished, info in pool.submit(work.location, chunk, rows):
                _chunk_done(work, finished, info, report, progress, on_step)
        for finished, info in pool.drain():
            _chunk_done(work, finished, info, report, progress, on_step)
    report.seconds["encode"] = time.monotonic() - began
    rate = report.plan.count / max(report.seconds["encode"], 1e-9)
    log.info(
        "encoded %d chunks (%d reused): %.0f passages/s", report.chunks_encoded, report.chunks_reused, rate
    )


def _chunk_done(
    work: WorkDir, chunk: int, info: dict, report: BuildReport, progress: tqdm, on_step: StepHook | None
) -> None:
    work.record(f"chunk-{chunk:06d}", info)
    report.chunks_encoded += 1
    report.note_peak("encode", info["peak_private"])
    progress.update(info["rows"])
    if on_step is not None:
        on_step(f"chunk-{chunk:06d}")
