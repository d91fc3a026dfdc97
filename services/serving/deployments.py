"""The Retriever and Generator Serve deployments, their typed configs, and what they exchange."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve

from cluster.index_store import list_versions, published_version
from services.serving.api import Doc


def default_index_root() -> str:
    """Where `rayrag serve` keeps the default index: $RAYRAG_CACHE or ~/.cache/rayrag, /index."""
    from services.rag.loading import cache_root

    return str(cache_root() / "index")


@dataclass
class BatchConfig:
    """`@serve.batch` settings; max_batch_size 1 turns batching off."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int ≥ 1, got {self.max_batch_size!r}")
        if not 0 <= self.batch_wait_timeout_s <= 1:
            raise ValueError(f"batch_wait_timeout_s must be in [0, 1], got {self.batch_wait_timeout_s!r}")


@dataclass
class DeploymentConfig:
    """Replicas (fixed, or a Serve autoscaling_config), CPUs per replica, batching."""

    num_replicas: int = 1
    autoscaling_config: dict[str, Any] | None = None
    num_cpus: float = 1.0
    torch_threads: int = 1
    batch: BatchConfig = field(default_factory=BatchConfig)

    def __post_init__(self) -> None:
        if isinstance(self.batch, dict):
            self.batch = BatchConfig(**self.batch)
        if not isinstance(self.num_replicas, int) or self.num_replicas < 1:
            raise ValueError(f"num_replicas must be an int ≥ 1, got {self.num_replicas!r}")
        if self.num_cpus < 0 or self.torch_threads < 1:
            raise ValueError(f"bad num_cpus {self.num_cpus!r} or torch_threads {self.torch_threads!r}")

    def deployment_options(self) -> dict[str, Any]:
        scale = ({"autoscaling_config": self.autoscaling_config} if self.autoscaling_config
                 else {"num_replicas": self.num_replicas})
        return {**scale, "ray_actor_options": {"num_cpus": self.num_cpus},
                "max_ongoing_requests": max(8, 2 * self.batch.max_batch_size)}


@dataclass
class RetrieverConfig(DeploymentConfig):
    """Query encoder + shard group; follows the index root's pointer every `follow_s` (0: off)."""

    index_root: str = field(default_factory=default_index_root)
    query_encoder: str = "default"
    version: str | None = None
    shard_replicas: int = 1
    shard_num_cpus: float = 1.0
    faiss_threads: int = 1
    follow_s: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.index_root = str(Path(self.index_root).expanduser())
        if self.follow_s < 0:
            raise ValueError(f"follow_s must be ≥ 0, got {self.follow_s!r}")


@dataclass
class GeneratorConfig(DeploymentConfig):
    """The generator: a name or a path (e.g. a checkpoint's export); doc scores come with requests."""

    generator: str = "default"


@dataclass
class IngressConfig:
    admin_token: str | None = None


BUILD_ONLY = ("shards", "corpus", "encoder")  # index args read by `rayrag serve` to build one


@dataclass
class AppConfig:
    """The `args:` of deploy.yaml. `models` names the query encoder and generator for both."""

    retriever: RetrieverConfig
    generator: GeneratorConfig
    ingress: IngressConfig

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "AppConfig":
        args = dict(args or {})
        known = {"index", "models", "retriever", "generator", "admin_token"}
        if unknown := sorted(set(args) - known):
            raise ValueError(f"unknown app args {unknown}; expected some of {sorted(known)}")
        index = {k: v for k, v in (args.get("index") or {}).items() if k not in BUILD_ONLY}
        root = index.pop("root", None)
        models = dict(args.get("models") or {})
        encoder = models.get("query_encoder", "default")
        retriever = {**_pick(RetrieverConfig, index), **(args.get("retriever") or {}),
                     "query_encoder": encoder, **({"index_root": root} if root else {})}
        generator = {**(args.get("generator") or {}), "generator": models.get("generator", "default")}
        return cls(RetrieverConfig(**retriever), GeneratorConfig(**generator),
                   IngressConfig(args.get("admin_token")))


def _pick(kind: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(kind)}
    if unknown := sorted(set(values) - names):
        raise ValueError(f"unknown index args {unknown}")
    return values


@dataclass
class Retrieved:
    """One question's top-k from one index version; `scores` are the doc scores RAG uses."""

    ids: list[int]
    titles: list[str]
    texts: list[str]
    scores: list[float]  # scale · q(x)ᵀ d(z)
    version: str
    coverage: float  # fraction of shards that answered
    retrieve_ms: float


@dataclass
class GenerateRequest:
    question: str
    titles: list[str]
    texts: list[str]
    doc_scores: list[float]  # (K,)
    mode: str
    decoding: str
    num_beams: int
    max_new_tokens: int

    def batch_key(self) -> tuple:
        """Requests with equal keys decode together in one `generate_answers` call."""
        return (self.mode, self.decoding, self.num_beams, self.max_new_tokens, len(self.titles))


@dataclass
class Generated:
    """An answer, or `error` naming why this request's input cannot be decoded (→ 422)."""

    answer: str
    generate_ms: float
    batch_size: int
    error: str | None = None


def docs_of(found: Retrieved) -> list[Doc]:
    """Provenance: the retrieved docs with their scores and p(z|x) = softmax(scores)."""
    from services.rag.marginal import doc_log_probs

    probs = doc_log_probs(torch.tensor([found.scores], dtype=torch.float32)).exp()[0]  # (K,)
    return [Doc(id=i, title=t, text=x, score=s, prob=float(p))
            for i, t, x, s, p in zip(found.ids, found.titles, found.texts, found.scores, probs)]


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

        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.encoder = TextEncoder.from_pretrained(config.query_encoder).eval()
        self.doc_score_scale = default_doc_score_scale(self.encoder)
        self.seen_pointer = published_version(config.index_root)
        self.group = ShardGroup(ShardGroupConfig(
            index_root=config.index_root, replicas=config.shard_replicas,
            num_cpus_per_replica=config.shard_num_cpus, faiss_threads=config.faiss_threads),
            version=config.version)
        self.failure: BaseException | None = None
        self.stop = threading.Event()
        _set_batching(self.retrieve, config.batch)
        if config.follow_s > 0:
            threading.Thread(target=self._follow, daemon=True, name="follow-index").start()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def retrieve(self, questions: list[str], ks: list[int]) -> list[Retrieved]:
        return await asyncio.to_thread(self._retrieve_batch, questions, ks)

    def _retrieve_batch(self, questions: list[str], ks: list[int]) -> list[Retrieved]:
        """Encode, search, and score the hits as RagModel does (from the stored doc vectors)."""
        from services.rag.model import scaled_doc_scores

        start = time.perf_counter()
        queries = self.encoder.encode(questions)  # (B, d)
        found = self.group.search(queries, k=max(ks), return_vectors=True)
        scores = scaled_doc_scores(torch.from_numpy(queries), torch.from_numpy(found.vectors),
                                   self.doc_score_scale).numpy()  # (B, k)
        elapsed = (time.perf_counter() - start) * 1000
        out = []
        for b, k in enumerate(ks):
            hit = np.flatnonzero(found.ids[b, :k] >= 0)  # fewer than k passages: drop -1 slots
            out.append(Retrieved(
                ids=found.ids[b, hit].tolist(), titles=[found.titles[b][i] for i in hit],
                texts=[found.texts[b][i] for i in hit], scores=scores[b, hit].tolist(),
                version=found.version, coverage=found.coverage, retrieve_ms=elapsed))
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
        return {"ok": self.failure is None and min(live) > 0, "index_version": report["version"],
                "coverage": report["coverage"], "live_replicas": live,
                "shards": report["shards"]}

    def index_info(self) -> dict[str, Any]:
        manifest = self.group.manifest
        return {"version": self.group.version, "passages": manifest.count,
                "shards": len(manifest.shards), "dim": manifest.dim,
                "encoder": manifest.encoder, "index_type": manifest.index_type,
                "published": published_version(self.config.index_root),
                "versions": list_versions(self.config.index_root)}

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
    """RAG decoding; `@serve.batch` groups compatible requests into one generate call."""

    def __init__(self, config: GeneratorConfig):
        from services.rag.generator import make_generator
        from services.rag.loading import load_generator

        torch.set_num_threads(config.torch_threads)
        model, tokenizer = load_generator(config.generator)
        self.generator = make_generator(model, tokenizer).eval()
        self.failure: BaseException | None = None
        _set_batching(self.generate, config.batch)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def generate(self, requests: list[GenerateRequest]) -> list[Generated]:
        return await asyncio.to_thread(self._generate_batch, requests)

    def _generate_batch(self, requests: list[GenerateRequest]) -> list[Generated]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[request.batch_key()].append(i)
        out: list[Generated | None] = [None] * len(requests)
        for indices in groups.values():
            for i, result in zip(indices, self._generate_safely([requests[i] for i in indices])):
                out[i] = result
        return out  # type: ignore[return-value]

    def _generate_safely(self, group: list[GenerateRequest]) -> list[Generated]:
        """One call for the group; if its input is refused (ValueError), one call per request so
        that only the request at fault gets the error."""
        try:
            return self._generate_group(group)
        except ValueError as error:
            if len(group) == 1:
                return [Generated("", 0.0, 1, error=str(error))]
            return [r for request in group for r in self._generate_safely([request])]

    def _generate_group(self, group: list[GenerateRequest]) -> list[Generated]:
        from services.rag.model import generate_answers

        start = time.perf_counter()
        first = group[0]
        try:
            answers = generate_answers(
                self.generator, [r.question for r in group], [r.titles for r in group],
                [r.texts for r in group], [r.doc_scores for r in group], mode=first.mode,
                decoding=first.decoding, num_beams=first.num_beams,
                max_new_tokens=first.max_new_tokens)
        except ValueError:
            raise
        except Exception as error:  # a broken model, not bad input: check_health restarts us
            self.failure = error
            raise
        elapsed = (time.perf_counter() - start) * 1000
        return [Generated(answer=a, generate_ms=elapsed, batch_size=len(group)) for a in answers]

    def check_health(self) -> None:
        if self.failure is not None:
            raise self.failure
