"""ensure_index: a pinned version, the published one, the newest without a corpus, else one built once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.bootstrap import IndexSpec, ensure_index
from cluster.index_build import build_index_from_vectors
from cluster.index_store import list_versions, load_manifest, published_version
from cluster.passages import Passage
from tests.tiny_models import save_tiny_encoder


def _version(root: Path, publish: bool) -> str:
    passages = [Passage(i, "t", f"passage {i}") for i in range(4)]
    return build_index_from_vectors(np.eye(4, dtype=np.float32), passages, root, publish=publish)


def test_pinned_and_published_versions_are_found_without_building(tmp_path: Path) -> None:
    first = _version(tmp_path, publish=True)
    second = _version(tmp_path, publish=False)
    assert ensure_index(IndexSpec(root=str(tmp_path))) == first  # published, though v0002 is newer
    assert ensure_index(IndexSpec(root=str(tmp_path), version=second)) == second
    with pytest.raises(ValueError, match="'v0009' is not in"):
        ensure_index(IndexSpec(root=str(tmp_path), version="v0009"))
    assert list_versions(tmp_path) == [first, second]


def test_without_a_corpus_the_root_must_hold_an_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not an index root"):
        ensure_index(IndexSpec(root=str(tmp_path), corpus=None))
    newest = [_version(tmp_path, publish=False) for _ in range(2)][-1]
    assert ensure_index(IndexSpec(root=str(tmp_path), corpus=None)) == newest  # nothing published
    assert published_version(tmp_path) is None


@pytest.mark.slow
def test_an_absent_index_is_built_from_the_corpus_once(ray_session, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"title": f"doc {i}", "text": f"river castle planet number {i}"} for i in range(6)]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    encoder = save_tiny_encoder(tmp_path / "encoder")
    spec = IndexSpec(
        root=str(tmp_path / "index"), corpus=str(corpus), corpus_limit=5, encoder=encoder, shards=2
    )
    version = ensure_index(spec)
    assert published_version(spec.root) == version
    manifest = load_manifest(spec.root, version)
    assert (manifest.count, len(manifest.shards)) == (5, 2)
    assert ensure_index(spec) == version and list_versions(spec.root) == [version]  # not built again
