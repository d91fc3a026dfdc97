"""The streaming build on Ray: recall with re-ranking, sharded Flat = one Flat, resume after a
failure with identical files, bounded worker memory, refusal before work, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from cluster.bm25 import query_tokens
from cluster.index_build import build_index_from_vectors
from cluster.index_store import load_manifest, published_version, version_dir
from cluster.merge import merge_hits, merge_topk
from cluster.passages import Passage
from cluster.shard import Shard, ShardConfig
from cluster.stream_build import StreamBuildConfig, stream_build
from cluster.synthetic import MixtureEncoder, synthetic_passages

pytestmark = pytest.mark.slow

DIM = 64
ENCODER = f"synthetic:dim={DIM},clusters=256,spread=0.5,seed=0"


def _config(root: Path, **given) -> StreamBuildConfig:
    settings = {"index_root": str(root), "encoder": ENCODER, "encoders": 2, "show_progress": False}
    return StreamBuildConfig(**(settings | {"max_worker_memory": "1GiB"} | given))


def _search(root: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """(B, k) ids of the published version, searched shard by shard and merged."""
    version = published_version(root)
    manifest = load_manifest(root, version)
    hits = [
        Shard(ShardConfig(index_root=str(root), version=version, shard=s)).search(queries, k)
        for s in range(len(manifest.shards))
    ]
    return merge_topk([h.scores for h in hits], [h.ids for h in hits], k)[1]


def _exact(n: int, queries: np.ndarray, k: int) -> np.ndarray:
    reference = faiss.IndexFlatIP(DIM)
    reference.add(MixtureEncoder.parse(ENCODER).vectors(0, n))
    return reference.search(queries, k)[1]


def test_ivf_pq_with_rflat_reranking_keeps_recall(ray_session, tmp_path: Path) -> None:
    n = 200_000
    config = _config(tmp_path, shards=2, index_type="IVF256,PQ16x4fs,RFlat")
    report = stream_build(lambda: synthetic_passages(n), config)
    queries = MixtureEncoder.parse(ENCODER).queries(1000, seed=7)  # fresh queries, not corpus rows
    found, exact = _search(tmp_path, queries, 10), _exact(n, queries, 10)
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(found, exact)])
    assert recall >= 0.95, recall
    manifest = load_manifest(tmp_path, report.version)
    assert manifest.recall_at_10 == report.recall_at_10 >= 0.95
    assert manifest.build_fingerprint == report.fingerprint
    assert report.plan.train_rows == 25_600  # the PQ codebooks' 256 × 100, one template for both shards
    assert not any(p.name.startswith(".build-") for p in tmp_path.iterdir())  # work dir removed


def test_sharded_flat_returns_the_ids_of_one_flat_index(ray_session, tmp_path: Path) -> None:
    n = 30_000
    stream_build(lambda: synthetic_passages(n), _config(tmp_path, shards=3))
    queries = MixtureEncoder.parse(ENCODER).queries(200, seed=8)
    assert np.array_equal(_search(tmp_path, queries, 10), _exact(n, queries, 10))


class _Killed(Exception):
    pass


def _kill_at(step: str):
    """A hook that fails the build at the first recorded step whose name starts with `step`."""

    def hook(name: str) -> None:
        if name.startswith(step):
            raise _Killed(name)

    return hook


def _digests(root: Path, version: str) -> list[dict[str, str]]:
    return [shard.sha256 for shard in load_manifest(root, version).shards]


def test_a_killed_build_resumes_without_reencoding_and_gives_identical_files(ray_session, tmp_path: Path):
    n, corpus = 60_000, lambda: synthetic_passages(60_000)
    settings = {"shards": 2, "index_type": "IVF64,PQ16x4fs,RFlat", "max_worker_memory": "800MiB"}
    reference = stream_build(corpus, _config(tmp_path / "reference", **settings))
    root = tmp_path / "resumed"
    with pytest.raises(_Killed):  # killed after two chunks
        stream_build(corpus, _config(root, **settings), on_step=_kill_at("chunk-000001"))
    with pytest.raises(_Killed):  # then after the first shard to finish
        stream_build(corpus, _config(root, **settings), on_step=_kill_at("shard-"))
    resumed = stream_build(corpus, _config(root, **settings))
    chunks = -(-n // reference.plan.chunk_rows)
    assert chunks >= 4 and resumed.fingerprint == reference.fingerprint
    assert (resumed.chunks_reused, resumed.chunks_encoded) == (chunks, 0)
    assert (resumed.shards_reused, resumed.shards_built) == (1, 1)
    assert _digests(root, resumed.version) == _digests(tmp_path / "reference", reference.version)
    first = version_dir(root, resumed.version) / "shard-0.faiss"
    assert (
        first.read_bytes()
        == (version_dir(tmp_path / "reference", reference.version) / "shard-0.faiss").read_bytes()
    )


def test_worker_memory_stays_flat_from_n_to_4n(ray_session, tmp_path: Path) -> None:
    """Peak private memory (VmHWM less file-backed and shared pages, reset at each task's start) of
    the encoding, training and add workers at N and 4N vectors with the same rows per shard."""
    peaks = {}
    for n, shards in ((50_000, 1), (200_000, 4)):
        config = _config(
            tmp_path / str(n), shards=shards, index_type="IVF64,PQ16x4fs,RFlat", recall_queries=100
        )
        peaks[n] = stream_build(lambda n=n: synthetic_passages(n), config).peak_private
    for kind in ("encode", "train", "add"):
        ratio = peaks[200_000][kind] / peaks[50_000][kind]
        assert 0.9 <= ratio <= 1.1, (kind, peaks)
    held_at_4n = 200_000 * DIM * 4  # what a worker holding every vector would add
    assert max(peaks[200_000].values()) - max(peaks[50_000].values()) < held_at_4n / 2, peaks


def test_a_plan_over_budget_is_refused_before_any_chunk(ray_session, tmp_path: Path) -> None:
    config = _config(tmp_path, shards=1, index_type="HNSW32", max_worker_memory="800MiB")
    with pytest.raises(
        ValueError, match=r"needs [\d,]+ bytes .* but --max-worker-memory is 838,860,800 bytes"
    ):
        stream_build(lambda: synthetic_passages(200_000), config)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_cli_build_prints_the_serve_command(ray_session, tmp_path: Path, capsys) -> None:
    from rayrag_cli import main
    from tests.tiny_models import save_tiny_encoder

    corpus = tmp_path / "corpus.jsonl"
    rows = [{"id": i, "title": f"t{i}", "text": f"passage number {i} about river {i % 7}"} for i in range(60)]
    corpus.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    encoder = save_tiny_encoder(tmp_path / "encoder", dim=32)
    root = tmp_path / "index"
    argv = ["index", "build", "--corpus", str(corpus), "--index-root", str(root), "--encoder", encoder]
    assert main([*argv, "--shards", "2", "--encoders", "1", "--max-worker-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert f"serve it with: rayrag serve --index-root {root}" in out
    manifest = load_manifest(root, "v0001")
    assert manifest.count == 60 and manifest.recall_at_10 == 1.0 and len(manifest.shards) == 2
    shard = Shard(ShardConfig(index_root=str(root), version="v0001", shard=1))
    assert shard.search(np.zeros((1, 32), np.float32), 1).titles[0][0].startswith("t")


def _worded_passages(n: int) -> list[Passage]:
    rng = np.random.default_rng(5)
    words = "river paris seine rhine london thames city bridge flows north sea island king queen war".split()
    return [
        Passage(i, f"title {rng.choice(words)}", " ".join(rng.choice(words, size=int(rng.integers(2, 30)))))
        for i in range(n)
    ]


def test_streamed_bm25_equals_one_shard_bm25_over_the_same_passages(ray_session, tmp_path: Path) -> None:
    n, passages = 20_000, _worded_passages(20_000)  # two chunk files; shard bounds fall inside them
    report = stream_build(lambda: iter(passages), _config(tmp_path / "stream", shards=3, recall_queries=50))
    vectors = MixtureEncoder.parse(ENCODER).vectors(0, n)
    one = build_index_from_vectors(vectors, passages, tmp_path / "one", shards=1)
    questions = ["Which river flows through Paris?", "king queen", "sea bridge island city", "war"]
    manifest = load_manifest(tmp_path / "stream", report.version)
    assert manifest.bm25 == load_manifest(tmp_path / "one", one).bm25
    tokens = query_tokens(questions, manifest)
    shards = [
        Shard(ShardConfig(index_root=str(tmp_path / "stream"), version=report.version, shard=s))
        for s in range(3)
    ]
    found = merge_hits([s.search_bm25(tokens, 20) for s in shards], 20, 1.0, False)
    expected = Shard(ShardConfig(index_root=str(tmp_path / "one"), version=one, shard=0)).search_bm25(
        tokens, 20
    )
    np.testing.assert_array_equal(found.ids, expected.ids)
    np.testing.assert_array_equal(found.scores, expected.scores)
    assert found.titles == expected.titles
