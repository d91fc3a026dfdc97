"""The typed configs of the Serve app: deploy.yaml's `args`, and what `build_app` hands each deployment."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from cluster.config import Config
from cluster.fusion import RetrievalConfig
from cluster.index_config import IndexConfig
from services.rag.config import ModelsConfig


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


class GeneratorConfig(DeploymentConfig):
    """deploy.yaml's `args.generator`: its replicas, and the threads of a batch that has the replica
    to itself (no other request held), so that a lone request uses every core (None: always
    `torch_threads`)."""

    torch_threads_alone: int | None = Field(None, ge=1)


class LimitsConfig(Config):
    """deploy.yaml's `args.limits`: what one request may ask for and wait."""

    request_timeout_s: float = Field(60.0, gt=0)  # past it: 504, and the decoding stops
    # n_docs × num_beams × max_new_tokens, the decoder rows × steps a request may ask for
    max_request_work: int = Field(4096, ge=1)
    retry_after_s: int = Field(1, ge=0)  # the Retry-After of a 503 when the queues are full


class AppConfig(Config):
    """deploy.yaml's `args:` (`build_app(args)`); `build_app` hands each deployment its parts as they
    are. Without `index.root`, the index lives under $RAYRAG_CACHE or ~/.cache/rayrag."""

    index: IndexConfig = Field(default_factory=lambda: IndexConfig(root=default_index_root()))
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)  # dense, bm25 or hybrid
    retriever: DeploymentConfig = Field(default_factory=DeploymentConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    admin_token: str | None = None

    @field_validator("index", mode="before")
    @classmethod
    def _default_root(cls, index: Any) -> Any:
        return {"root": default_index_root(), **index} if isinstance(index, dict) else index
