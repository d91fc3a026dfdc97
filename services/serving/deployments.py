"""The Retriever and Generator Serve deployments, their typed configs, and what they exchange."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator
from ray import serve

from cluster import storage
from cluster.config import Config
from cluster.fusion import RetrievalConfig
from cluster.index_store import list_versions, published_version
from services.rag.precision import Precision
from services.rag.retrieval import Retrieved, group_search, retrieve
from services.rag.stopping import GenerationStopped
from services.serving.api import Doc
from services.serving.engine import Emit, EngineFactory, GenerateRequest, RagEngine
from services.serving.metrics import IN_FLIGHT, QUEUED


def default_index_root() -> str:
    """Where `rayrag serve` keeps the default index: $RAYRAG_CACHE or ~/.cache/rayrag, /index."""
    from services.rag.loading import cache_root

    return str(cache_root() / "index")


class BatchConfig(Config):
    """`@serve.batch` settings; max_batch_size 1 turns batching off."""

    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1)


class DeploymentConfig(Config):
    """Replicas (fixed, or a Serve autoscaling_config), CPUs per replica, batching, and the
    bounded queues: a replica works on `max_ongoing_requests` (default: two batches) and the
    callers of a deployment hold at most `max_queued_requests` more; past that, 503.
    `torch_threads` None: the CPUs Ray reserved for the replica, rounded up."""

    num_replicas: int = Field(1, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    num_cpus: float = Field(1.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(64, ge=1)

    def deployment_options(self) -> dict[str, Any]:
        scale = (
            {"autoscaling_config": self.autoscaling_config}
            if self.autoscaling_config
            else {"num_replicas": self.num_replicas}
        )
        return {
            **scale,
            "ray_actor_options": {"num_cpus": self.num_cpus},
            "max_ongoing_requests": self.max_ongoing_requests or max(8, 2 * self.batch.max_batch_size),
            "max_queued_requests": self.max_queued_requests,
        }


class ServedIndex(Config):
    """The index a Retriever serves: the root's (a path, or an s3:// / gs:// URI) published version,
    followed every `follow_s` seconds (0: off), or a pinned `version`; per shard, `shard_replicas`
    actors of `shard_cpus`, on distinct nodes where the cluster has them."""

    index_root: str = Field(default_factory=default_index_root, alias="root")
    version: str | None = None
    shard_replicas: int = Field(1, ge=1)
    shard_cpus: float = Field(1.0, ge=0)
    faiss_threads: int = Field(1, ge=1)
    follow_s: float = Field(2.0, ge=0)

    shard_cache_dir: str | None = None  # each node's shard file cache (None: cluster.shard_cache.cache_dir)

    @field_validator("index_root")
    @classmethod
    def _expand(cls, root: str) -> str:
        return root if storage.is_uri(root) else str(Path(root).expanduser())


class IndexArgs(ServedIndex):
    """deploy.yaml's `args.index`; `rayrag serve` builds the index from these when the root has none."""

    shards: int = Field(1, ge=1)
    corpus: str = "default"
    encoder: str = "default"  # the document encoder


class RetrieverConfig(DeploymentConfig, ServedIndex):
    """Query encoder + shard group, and which retriever answers (dense, bm25, hybrid)."""

    query_encoder: str = "default"
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)


class GeneratorArgs(DeploymentConfig):
    """deploy.yaml's `args.generator`: its replicas, and the threads of a batch that has the replica
    to itself (no other request held), so that a lone request uses every core (None: always
    `torch_threads`)."""

    torch_threads_alone: int | None = Field(None, ge=1)


class GeneratorConfig(GeneratorArgs):
    """The generator: a name or a path (e.g. a checkpoint's export); doc scores come with requests."""

    generator: str = "default"
    precision: Precision = "auto"  # the generator's weights (services/rag/precision.py)


class LimitsConfig(Config):
    """deploy.yaml's `args.limits`: what one request may ask for and wait."""

    request_timeout_s: float = Field(60.0, gt=0)  # past it: 504, and the decoding stops
    # n_docs × num_beams × max_new_tokens, the decoder rows × steps a request may ask for
    max_request_work: int = Field(4096, ge=1)
    retry_after_s: int = Field(1, ge=0)  # the Retry-After of a 503 when the queues are full


class IngressConfig(Config):
    admin_token: str | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)


class ModelsArgs(Config):
    """deploy.yaml's `args.models`: names or paths, e.g. the folders of a training export."""

    query_encoder: str = "default"
    generator: str = "default"
    precision: Precision = "auto"  # the generator's weights


class AppArgs(Config):
    """The `args:` of deploy.yaml's application (`build_app(args)`)."""

    index: IndexArgs = Field(default_factory=IndexArgs)
    models: ModelsArgs = Field(default_factory=ModelsArgs)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)  # dense, bm25 or hybrid
    retriever: DeploymentConfig = Field(default_factory=DeploymentConfig)
    generator: GeneratorArgs = Field(default_factory=GeneratorArgs)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    admin_token: str | None = None


class AppConfig(Config):
    """The configs `build_app` hands to each deployment."""

    retriever: RetrieverConfig
    generator: GeneratorConfig
    ingress: IngressConfig

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> AppConfig:
        """deploy.yaml's `args:` → one config per deployment; a ValueError names a bad key."""
        parsed = AppArgs.parse(args or {}, "args.")
        served = parsed.index.model_dump(by_alias=True, include=set(ServedIndex.model_fields))
        retriever = RetrieverConfig.model_validate(
            {
                **parsed.retriever.model_dump(),
                **served,
                "query_encoder": parsed.models.query_encoder,
                "retrieval": parsed.retrieval,
            }
        )
        generator = GeneratorConfig.model_validate(
            {
                **parsed.generator.model_dump(),
                "generator": parsed.models.generator,
                "precision": parsed.models.precision,
            }
        )
        ingress = IngressConfig(admin_token=parsed.admin_token, limits=parsed.limits)
        return cls(retriever=retriever, generator=generator, ingress=ingress)


def reserved_threads(configured: int | None) -> int:
    """`configured`, else the CPUs Ray reserved for this replica rounded up (1 outside a Ray worker)."""
    if configured is not None:
        return configured
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return 1
    return max(1, -int(-ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0) // 1))


@dataclass
class Generated:
    """An answer, or `error` naming why this request's input cannot be decoded (→ 422), or why
    its decoding was stopped (`stopped`: its caller left or its deadline passed), or why it was
    refused (`wait_s`: it could not finish by its deadline behind the work queued ahead, which
    takes about `wait_s` seconds)."""

    answer: str
    generate_ms: float
    batch_size: int
    error: str | None = None
    stopped: bool = False
    wait_s: float | None = None


class Ticket:
    """A request's claim on the decoding; void once its caller has gone or its deadline passed."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self.cancelled = False

    def void(self) -> bool:
        return self.cancelled or (self.deadline is not None and time.time() >= self.deadline)


def docs_of(found: Retrieved) -> list[Doc]:
    """Provenance of one question: its docs with their doc scores and p(z|x) = softmax(doc scores)."""
    from services.rag.marginal import doc_log_probs

    probs = doc_log_probs(torch.from_numpy(found.doc_scores)).exp()[0]  # (K,)
    parts = found.part_scores or {}
    return [
        Doc(
            id=int(found.ids[0, j]),
            title=found.titles[0][j],
            text=found.texts[0][j],
            score=float(found.doc_scores[0, j]),
            prob=float(probs[j]),
            retriever=str(found.found_by[0, j]) if found.found_by is not None else found.retriever,
            dense_score=_finite(parts["dense"][0, j]) if "dense" in parts else None,
            bm25_score=_finite(parts["bm25"][0, j]) if "bm25" in parts else None,
            fused_score=float(found.scores[0, j]) if found.retriever == "hybrid" else None,
        )
        for j in range(len(found.titles[0]))
    ]


def _finite(value: float) -> float | None:
    """A retriever's own score, or None where its top-N did not hold the passage (NaN)."""
    return None if np.isnan(value) else float(value)


def _set_batching(method: Any, batch: BatchConfig) -> None:
    method.set_max_batch_size(batch.max_batch_size)
    method.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    """Encodes batched questions and searches the shard group (pinned to one version per batch)."""

    def __init__(self, config: RetrieverConfig):
        from cluster.encoders import TextEncoder
        from cluster.shard_group import ShardGroup, ShardGroupConfig
        from services.rag.model import default_doc_score_scale

        torch.set_num_threads(reserved_threads(config.torch_threads))
        self.config = config
        self.encoder = TextEncoder.from_pretrained(config.query_encoder).eval()
        self.doc_score_scale = default_doc_score_scale(self.encoder)
        self.retrieval = config.retrieval
        self.seen_pointer = published_version(config.index_root)
        self.group = ShardGroup(
            ShardGroupConfig(
                index_root=config.index_root,
                replicas=config.shard_replicas,
                shard_cpus=config.shard_cpus,
                faiss_threads=config.faiss_threads,
                cache_dir=config.shard_cache_dir,
            ),
            version=config.version,
        )
        self.failure: BaseException | None = None
        self.stop = threading.Event()
        _set_batching(self.retrieve, config.batch)
        if config.follow_s > 0:
            threading.Thread(target=self._follow, daemon=True, name="follow-index").start()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def retrieve(
        self, questions: list[str], ks: list[int], retrievers: list[str | None]
    ) -> list[Retrieved]:
        return await asyncio.to_thread(self._retrieve_batch, questions, ks, retrievers)

    def _retrieve_batch(
        self, questions: list[str], ks: list[int], retrievers: list[str | None]
    ) -> list[Retrieved]:
        """One retrieval per retriever asked for in the batch (each from one index version); each
        question gets a batch of one with its first k hits, fewer when the index holds fewer."""
        search, out = group_search(self.group), [None] * len(questions)
        names = [r or self.retrieval.retriever for r in retrievers]
        for name in dict.fromkeys(names):
            rows = [b for b, r in enumerate(names) if r == name]
            config = self.retrieval.model_copy(update={"retriever": name})
            asked, k = [questions[b] for b in rows], max(ks[b] for b in rows)
            found = retrieve(self.encoder, search, asked, k, self.doc_score_scale, retrieval=config)
            for row, b in enumerate(rows):
                out[b] = found.for_question(row, ks[b])
        return out

    def swap(self, version: str) -> str:
        """Swap the shard group to `version` (admin call, broadcast to every replica)."""
        self.group.swap(version)
        return self.group.version

    def _follow(self) -> None:
        """Swap when the index root's pointer file names a new version."""
        while not self.stop.wait(self.config.follow_s):
            try:
                pointer = published_version(self.config.index_root)
                if pointer is not None and pointer != self.seen_pointer:
                    if pointer != self.group.version:
                        self.swap(pointer)
                    self.seen_pointer = pointer
            except Exception as error:  # surfaced by check_health, which restarts the replica
                self.failure = error
                return

    def health(self) -> dict[str, Any]:
        """Index version, coverage and live replicas per shard; ok while every shard has one."""
        report = self.group.health()
        live = [sum(r["state"] == "ready" for r in row) for row in report["shards"]]
        return {
            "ok": self.failure is None and min(live) > 0,
            "index_version": report["version"],
            "coverage": report["coverage"],
            "live_replicas": live,
            "shards": report["shards"],
        }

    def index_info(self) -> dict[str, Any]:
        manifest = self.group.manifest
        return {
            "version": self.group.version,
            "passages": manifest.count,
            "shards": len(manifest.shards),
            "dim": manifest.dim,
            "encoder": manifest.encoder,
            "index_type": manifest.index_type,
            "published": published_version(self.config.index_root),
            "versions": list_versions(self.config.index_root),
        }

    def check_health(self) -> None:
        if self.failure is not None:
            raise self.failure
        report = self.group.health()
        if report["coverage"] == 0:
            raise RuntimeError(f"shard group has no live shard: {report}")

    def __del__(self) -> None:
        self.stop.set()
        self.group.close()


@serve.deployment(name="Generator")
class GeneratorDeployment:
    """Answers with an injected engine (`RagEngine` by default): `@serve.batch` groups compatible
    requests into one engine call, which stops once every request in it is void (`Ticket`);
    `stream` answers one request piece by piece. One engine call runs at a time, and a request
    that could not finish by its deadline behind the work held already is refused at once."""

    def __init__(self, config: GeneratorConfig, engine: EngineFactory = RagEngine):
        self.threads = reserved_threads(config.torch_threads)
        torch.set_num_threads(self.threads)
        self.config = config
        self.engine = engine(config.generator, config.precision)
        self.failure: BaseException | None = None
        self.held = 0  # requests admitted and not yet answered (event loop only)
        self.held_work = 0  # their work (`GenerateRequest.work`)
        self.working = 0  # of those, inside an engine call (engine thread only)
        self.stopped = 0  # engine calls stopped because nobody waited for them any more
        self.seconds_per_work: float | None = None  # measured over the engine calls (moving average)
        self.engine_lock = threading.Lock()
        _set_batching(self._batched, config.batch)

    def admit(self, request: GenerateRequest) -> Generated | None:
        """None when the request can finish by its deadline behind the work held (or none is held,
        or nothing is measured yet); else its refusal with the estimated wait."""
        rate = self.seconds_per_work
        if rate is None or request.deadline is None or not self.held:
            return None
        wait = self.held_work * rate
        if time.time() + wait + request.work() * rate <= request.deadline:
            return None
        return Generated("", 0.0, 0, error=f"the work queued ahead takes about {wait:.1f} s", wait_s=wait)

    async def generate(self, request: GenerateRequest) -> Generated:
        """Answer one request; cancelling the call (caller gone, deadline) voids its ticket."""
        refused = self.admit(request)
        if refused is not None:
            return refused
        ticket = Ticket(request.deadline)
        self._hold(request, 1)
        try:
            return await self._batched(request, ticket)
        except asyncio.CancelledError:
            ticket.cancelled = True
            raise
        finally:
            self._hold(request, -1)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[str | Generated]:
        """Answer one request as it decodes: the final pieces of its text, then its `Generated`
        (the refusal alone when it is not admitted). Closing the stream voids its ticket."""
        refused = self.admit(request)
        if refused is not None:
            yield refused
            return
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        ticket = Ticket(request.deadline)
        self._hold(request, 1)
        decoding = asyncio.ensure_future(
            asyncio.to_thread(
                self._stream_one, request, ticket, partial(loop.call_soon_threadsafe, pieces.put_nowait)
            )
        )
        decoding.add_done_callback(lambda _: (self._hold(request, -1), pieces.put_nowait(None)))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            yield await decoding
        finally:  # also when the caller has gone: the decoding stops at its next step
            ticket.cancelled = True

    def _stream_one(self, request: GenerateRequest, ticket: Ticket, emit: Emit) -> Generated:
        if ticket.void():
            return _stopped("before decoding")
        try:
            with self._engine_call([request]) as started:
                answer = self.engine.stream(request, ticket.void, emit)
        except GenerationStopped as stopped:
            return _stopped(str(stopped))
        except ValueError as error:
            return Generated("", 0.0, 1, error=str(error))
        return Generated(answer, (time.perf_counter() - started) * 1000, 1)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batched(self, requests: list[GenerateRequest], tickets: list[Ticket]) -> list[Generated]:
        return await asyncio.to_thread(self.generate_batch, requests, tickets)

    def _threads(self, batch: int) -> int:
        """All the replica's threads for a batch nobody else waits behind, else its share under load."""
        alone = self.config.torch_threads_alone
        return alone if alone is not None and self.held <= batch else self.threads

    def load(self) -> dict[str, int]:
        """Requests held (queued or decoding), those being decoded now, engine calls stopped."""
        return {"held": self.held, "working": self.working, "stopped": self.stopped}

    def _hold(self, request: GenerateRequest, change: int) -> None:
        self.held += change
        self.held_work += change * request.work()
        self._report()

    def _report(self) -> None:
        tags = {"deployment": "Generator"}
        IN_FLIGHT.set(self.held, tags=tags)
        QUEUED.set(max(0, self.held - self.working), tags=tags)

    def generate_batch(
        self, requests: list[GenerateRequest], tickets: list[Ticket] | None = None
    ) -> list[Generated]:
        """One engine call per group of equal `batch_key()`; results in request order. Requests
        already void are answered `stopped` without decoding."""
        tickets = tickets or [Ticket(r.deadline) for r in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        out = [_stopped("before decoding") for _ in requests]
        for i, request in enumerate(requests):
            if not tickets[i].void():
                groups[request.batch_key()].append(i)
        for indices in groups.values():
            group = [(requests[i], tickets[i]) for i in indices]
            for i, result in zip(indices, self._generate_safely(group)):
                out[i] = result
        return out

    def _generate_safely(self, group: list[tuple[GenerateRequest, Ticket]]) -> list[Generated]:
        """One call for the group; if its input is refused (ValueError), one call per request so
        that only the request at fault gets the error."""
        try:
            return self._generate_group(group)
        except ValueError as error:
            if len(group) == 1:
                return [Generated("", 0.0, 1, error=str(error))]
            return [r for member in group for r in self._generate_safely([member])]

    def _generate_group(self, group: list[tuple[GenerateRequest, Ticket]]) -> list[Generated]:
        requests, tickets = [r for r, _ in group], [t for _, t in group]
        try:
            with self._engine_call(requests) as started:
                answers = self.engine.generate(requests, stop=lambda: all(t.void() for t in tickets))
        except GenerationStopped as stopped:
            return [_stopped(str(stopped)) for _ in group]
        elapsed = (time.perf_counter() - started) * 1000
        return [Generated(answer=a, generate_ms=elapsed, batch_size=len(group)) for a in answers]

    @contextmanager
    def _engine_call(self, requests: list[GenerateRequest]) -> Iterator[float]:
        """One engine call at a time, on the replica's threads; yields its start and measures the
        seconds per unit of work of the calls that answer. A broken engine (not bad input, not a
        stop) is kept for check_health, which restarts the replica."""
        with self.engine_lock:
            start = time.perf_counter()
            self.working += len(requests)
            self._report()
            torch.set_num_threads(self._threads(len(requests)))
            try:
                yield start
            except GenerationStopped:
                self.stopped += 1
                raise
            except ValueError:
                raise
            except Exception as error:
                self.failure = error
                raise
            finally:
                self.working -= len(requests)
                self._report()
            sample = (time.perf_counter() - start) / sum(r.work() for r in requests)
            last = self.seconds_per_work
            self.seconds_per_work = sample if last is None else 0.7 * last + 0.3 * sample

    def check_health(self) -> None:
        if self.failure is not None:
            raise self.failure


def _stopped(why: str) -> Generated:
    return Generated("", 0.0, 0, error=why, stopped=True)
