"""Index bootstrap: the version an entry point searches, built from its corpus when the root has none."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.index_build import build_index
from cluster.index_store import list_versions, published_version, resolve_version
from cluster.passages import Passage, load_corpus

if TYPE_CHECKING:
    import torch

    from cluster.index_config import IndexConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexSpec:
    """Where an index lives and what to build there when it is absent (keys of the index configs)."""

    root: str  # INDEX_ROOT: a path or an object-store URI
    version: str | None = None  # pinned: it must exist; nothing is built
    corpus: str | None = "default"  # load_corpus spec; None: never build, the root must hold an index
    corpus_limit: int | None = None  # the first passages only
    encoder: str = "default"  # the document encoder (name or path)
    shards: int = 1

    @classmethod
    def of(cls, index: IndexConfig, doc_encoder: str) -> IndexSpec:
        """The spec of an index config (deploy.yaml's `args.index`, the training config's `index`)."""
        return cls(
            root=index.index_root,
            version=index.version,
            corpus=index.corpus,
            corpus_limit=index.corpus_limit,
            encoder=doc_encoder,
            shards=index.shards,
        )

    def passages(self) -> list[Passage]:
        """The corpus this index is built from."""
        if self.corpus is None:
            raise ValueError(f"index root {self.root!r} has no corpus to build from")
        return load_corpus(self.corpus, self.corpus_limit)


def ensure_index(
    spec: IndexSpec, encoder_state: dict[str, torch.Tensor] | None = None, show_progress: bool = False
) -> str:
    """The version to search: the pinned one, else the root's published one, else (when the spec names
    a corpus) one built from it with the document encoder (`encoder_state`: trained weights), published.

    Without a corpus, a root that holds versions but none published gives its newest."""
    if spec.version is not None:
        versions = list_versions(spec.root)
        if spec.version not in versions:
            raise ValueError(f"index version {spec.version!r} is not in {spec.root}; it has {versions}")
        log.info("index: %s (version %s, pinned)", spec.root, spec.version)
        return spec.version
    version = published_version(spec.root)
    if version is None and spec.corpus is None:
        version = resolve_version(spec.root, None)  # ValueError naming a root without versions
    if version is not None:
        log.info("index: %s (version %s)", spec.root, version)
        return version
    log.info("index: none at %s; building it from corpus %r (once)", spec.root, spec.corpus)
    passages = spec.passages()
    version = build_index(
        passages,
        spec.root,
        encoder=spec.encoder,
        shards=spec.shards,
        encoder_state=encoder_state,
        publish=True,
        show_progress=show_progress,
    )
    log.info("index: built and published %s (%d passages)", version, len(passages))
    return version
