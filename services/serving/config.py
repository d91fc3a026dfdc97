"""The typed configs of the Serve app: deploy.yaml's `args`, and what `build_app` hands each deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from cluster import storage
from cluster.config import Config
from cluster.fusion import RetrievalConfig
from services.rag.precision import Precision


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
