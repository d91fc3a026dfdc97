"""Planning a streaming build without Ray: sizes from the budget, refusals naming bytes, synthetic rows."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.build_plan import WORKER_BASE, bytes_per_vector, fingerprint, parse_bytes, plan_build
from cluster.build_work import pieces
from cluster.synthetic import MixtureEncoder


@pytest.mark.parametrize(
    ("text", "count"), [("4GiB", 4 << 30), ("512MiB", 512 << 20), ("2G", 2 << 30), ("1000", 1000)]
)
def test_parse_bytes(text: str, count: int) -> None:
    assert parse_bytes(text) == count


@pytest.mark.parametrize("text", ["", "four", "-1GiB", "0"])
def test_parse_bytes_names_a_bad_size(text: str) -> None:
    with pytest.raises(ValueError, match="bad memory size"):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("index_type", "expected"),
    [("Flat", 768 * 4), ("IVF1024,PQ64", 64 + 8), ("IVF1024,PQ64x4fs,RFlat", 32 + 8 + 768 * 4), ("PQ96", 96)],
)
def test_bytes_per_vector(index_type: str, expected: float) -> None:
    assert bytes_per_vector(index_type, 768) == expected


def test_hnsw_counts_its_links() -> None:
    assert 768 * 4 + 64 * 4 < bytes_per_vector("HNSW32", 768) < 768 * 4 + 64 * 4 * 1.2


def test_an_hnsw_shard_over_the_budget_is_refused_with_its_bytes() -> None:
    with pytest.raises(ValueError) as error:
        plan_build(21_000_000, 768, "HNSW32", 4, parse_bytes("4GiB"))
    message = str(error.value)
    assert "a shard of index type 'HNSW32' needs 17," in message  # 5.25M × ~3.3 kB
    assert "5,250,000 vectors" in message and "4,294,967,296 bytes (4.00 GiB" in message
    assert "use at least 22 --shards" in message


def test_a_budget_below_the_worker_itself_is_refused() -> None:
    with pytest.raises(ValueError, match="below the 0.75 GiB a build worker holds"):
        plan_build(1000, 64, "Flat", 1, WORKER_BASE - 1)


def test_sizes_follow_the_budget_and_fit() -> None:
    small, large = (
        plan_build(10_000_000, 768, "IVF4096,PQ64,RFlat", 64, parse_bytes(b)) for b in ("2GiB", "8GiB")
    )
    tight = plan_build(1_000_000, 768, "Flat", 64, parse_bytes("1GiB"))
    assert tight.chunk_rows < large.chunk_rows == 16_384
    for plan in (tight, small, large):
        assert max(plan.worker_bytes().values()) <= plan.budget - WORKER_BASE
    assert large.train_rows == 409_600  # 100 per IVF list
    assert small.train_rows < large.train_rows  # shrunk to fit, still ≥ 39 per list
    assert small.train_rows >= 39 * 4096


def test_fingerprint_is_stable_and_names_its_parts() -> None:
    parts = {"corpus": "abc", "shards": 2, "chunk_rows": 100}
    assert fingerprint(parts) == fingerprint(dict(reversed(parts.items())))
    assert fingerprint(parts) != fingerprint(parts | {"shards": 3})


def test_pieces_cover_a_range_across_chunks() -> None:
    assert list(pieces(5, 25, 10)) == [(0, 5, 10), (1, 0, 10), (2, 0, 5)]


def test_synthetic_rows_do_not_depend_on_how_the_range_is_cut() -> None:
    encoder = MixtureEncoder(32, clusters=8, seed=3)
    whole = encoder.vectors(0, 10_000)  # (N, d)
    assert np.array_equal(np.concatenate([encoder.vectors(0, 4097), encoder.vectors(4097, 10_000)]), whole)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, rtol=1e-5)
    assert MixtureEncoder.parse(encoder.name).fingerprint() == encoder.fingerprint()
