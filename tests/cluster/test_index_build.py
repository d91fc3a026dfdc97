"""build_index on Ray with a tiny encoder: vectors equal local encoding; encoder_state; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.encoders import TextEncoder
from cluster.index_build import build_index
from cluster.index_store import list_versions, load_manifest, published_version
from cluster.passages import Passage, passage_text
from cluster.shard import Shard, ShardConfig
from rayrag_cli import main
from tests.tiny_models import save_tiny_encoder

WORDS = "river castle planet violin harbor desert glacier market engine poem forest comet".split()


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny", dim=32)


def _passages(n: int) -> list[Passage]:
    return [
        Passage(id=i, title=WORDS[i % 12], text=" ".join(WORDS[(i * 5 + j) % 12] for j in range(3 + i % 9)))
        for i in range(n)
    ]


def _stored(root: Path, version: str) -> np.ndarray:
    """All document vectors of a version, read back through the shards."""
    shards = len(load_manifest(root, version).shards)
    parts = []
    for s in range(shards):
        shard = Shard(ShardConfig(index_root=str(root), version=version, shard=s))
        parts.append(shard.index.reconstruct_n(0, shard.index.ntotal))
    return np.concatenate(parts)  # (N, d)


def test_build_on_ray_matches_local_encoding(ray_session, tmp_path: Path, encoder_path: str) -> None:
    passages = _passages(30)
    version = build_index(
        passages, tmp_path, encoder=encoder_path, shards=2, num_encoders=2, batch_size=2, show_progress=False
    )
    local = TextEncoder.from_pretrained(encoder_path)
    expected = local.encode([passage_text(p) for p in passages])  # (N, d)
    np.testing.assert_allclose(_stored(tmp_path, version), expected, atol=1e-5)
    manifest = load_manifest(tmp_path, version)
    assert (manifest.encoder, manifest.encoder_fingerprint, manifest.dim) == (
        encoder_path,
        local.fingerprint(),
        32,
    )

    state = {key: value.clone() for key, value in local.state_dict().items()}
    first = next(key for key in state if key.endswith("word_embeddings.weight"))
    state[first] += 0.5 * torch.randn_like(state[first])  # as if training moved the document encoder
    local.load_state_dict(state)
    refreshed = build_index(
        passages, tmp_path, encoder=encoder_path, encoder_state=state, publish=False, show_progress=False
    )
    assert (
        load_manifest(tmp_path, refreshed).encoder_fingerprint
        == local.fingerprint()
        != manifest.encoder_fingerprint
    )
    np.testing.assert_allclose(
        _stored(tmp_path, refreshed), local.encode([passage_text(p) for p in passages]), atol=1e-5
    )
    assert published_version(tmp_path) == version


def test_bad_build_inputs(ray_session, tmp_path: Path, encoder_path: str) -> None:
    with pytest.raises(ValueError, match="has no text"):
        build_index([Passage(id=0, title="t", text=" ")], tmp_path, encoder=encoder_path)
    with pytest.raises(ValueError, match="NoSuchIndex"):
        build_index(
            _passages(4), tmp_path, encoder=encoder_path, index_type="NoSuchIndex", show_progress=False
        )
    with pytest.raises(ValueError, match="shards"):
        build_index(_passages(4), tmp_path, encoder=encoder_path, shards=5)
    assert list_versions(tmp_path) == []


def test_cli_build_and_list(
    ray_session, tmp_path: Path, encoder_path: str, capsys: pytest.CaptureFixture
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "\n".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) for p in _passages(12))
    )
    root = tmp_path / "index"
    argv = [
        "index",
        "build",
        "--corpus",
        str(corpus),
        "--shards",
        "3",
        "--index-type",
        "HNSW16",
        "--index-root",
        str(root),
        "--encoder",
        encoder_path,
        "--encoders",
        "2",
        "--encoder-cpus",
        "0.5",
    ]
    assert main(argv) == 0
    assert main(["index", "list", "--index-root", str(root)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["version"], row["published"], row["count"], row["shards"]) == ("v0001", True, 12, 3)
    assert (
        main(argv[:-8] + ["--index-type", "Nope7", "--index-root", str(root), "--encoder", encoder_path]) == 2
    )
    with pytest.raises(SystemExit, match="2"):
        main(argv[:-1] + ["-1"])
    assert "--encoder-cpus: must be a number ≥ 0, got -1" in capsys.readouterr().err
    assert main(["index", "list", "--index-root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
