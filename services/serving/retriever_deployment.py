"""The Retriever deployment: batched questions → query vectors → the shard group's top-k."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import torch
from ray import serve

from cluster.fusion import RetrievalConfig
from cluster.index_config import IndexConfig
from cluster.index_store import list_versions, published_version
from services.rag.config import ModelsConfig
from services.rag.retrieval import Retrieved, group_search, retrieve
from services.serving.config import DeploymentConfig
from services.serving.replica import reserved_threads, set_batching


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    """Encodes batched questions and searches the shard group (pinned to one version per batch)."""

    def __init__(
        self, config: DeploymentConfig, index: IndexConfig, models: ModelsConfig, retrieval: RetrievalConfig
    ):
        from cluster.encoders import TextEncoder
        from cluster.shard_group import ShardGroup
        from services.rag.model import default_doc_score_scale

        torch.set_num_threads(reserved_threads(config.torch_threads))
        self.index = index
        self.encoder = TextEncoder.from_pretrained(models.query_encoder).eval()
        self.doc_score_scale = default_doc_score_scale(self.encoder)
        self.retrieval = retrieval
        self.seen_pointer = published_version(index.index_root)
        self.group = ShardGroup(index, version=index.version)
        self.failure: BaseException | None = None
        self.stop = threading.Event()
        set_batching(self.retrieve, config.batch)
        if index.follow_s > 0:
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
        while not self.stop.wait(self.index.follow_s):
            try:
                pointer = published_version(self.index.index_root)
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
            "published": published_version(self.index.index_root),
            "versions": list_versions(self.index.index_root),
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
