"""A seeded Gaussian-mixture "encoder": L2-normalised vectors that depend only on passage ids.

It stands in for a document encoder in tests and benchmarks at sizes no CPU could encode: rows
cluster like real embeddings do (uniform noise would make IVF/PQ recall look worse than it is),
and any row can be produced alone, so a chunk task needs no other rows.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import numpy as np

from cluster.passages import Passage

PREFIX = "synthetic:"
_SPEC = re.compile(r"^synthetic:dim=(\d+),clusters=(\d+),spread=([0-9.]+),seed=(\d+)$")
ROWS_PER_BLOCK = 4096  # rows drawn from one seeded generator
LOW_RANK = 16  # dimensions the within-cluster spread mostly lies in


class MixtureEncoder:
    """`synthetic:dim=D,clusters=C,spread=S,seed=R`: row i is a unit vector near one of C centres."""

    def __init__(self, dim: int, clusters: int = 256, spread: float = 0.35, seed: int = 0) -> None:
        if dim < 1 or clusters < 1 or spread <= 0:
            raise ValueError(f"bad synthetic encoder dim={dim}, clusters={clusters}, spread={spread}")
        self.dim, self.clusters, self.spread, self.seed = dim, clusters, spread, seed
        self.name = f"{PREFIX}dim={dim},clusters={clusters},spread={spread:g},seed={seed}"
        centres = np.random.default_rng([seed, 0]).standard_normal((clusters, dim))  # (C, d)
        self.centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
        basis = np.random.default_rng([seed, 3]).standard_normal((LOW_RANK, dim))  # (r, d)
        self.basis = (basis / np.sqrt(LOW_RANK * dim)).astype(np.float32)  # rows of norm ≈ 1/√r

    @classmethod
    def parse(cls, spec: str) -> MixtureEncoder:
        match = _SPEC.match(spec)
        if not match:
            raise ValueError(
                f"bad synthetic encoder {spec!r}: expected 'synthetic:dim=D,clusters=C,spread=S,seed=R'"
            )
        dim, clusters, spread, seed = match.groups()
        return cls(int(dim), int(clusters), float(spread), int(seed))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()[:16]

    def _sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """`count` unit rows: a centre plus noise mostly inside a low-dimensional subspace, as real
        embeddings have a low intrinsic dimension."""
        which = rng.integers(0, self.clusters, count)  # (n,)
        # einsum, not BLAS: the same bits whatever thread count the encoding process has
        low = np.einsum(
            "nr,rd->nd", rng.standard_normal((count, LOW_RANK), dtype=np.float32), self.basis
        )  # (n, d)
        iso = rng.standard_normal((count, self.dim), dtype=np.float32) * np.float32(0.2 / np.sqrt(self.dim))
        rows = self.centres[which] + np.float32(self.spread) * (low + iso)  # (n, d)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def _block(self, block: int) -> np.ndarray:
        return self._sample(np.random.default_rng([self.seed, 1, block]), ROWS_PER_BLOCK)

    def vectors(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, d) float32 vectors of ids start..stop-1, the same however the range is cut."""
        if not 0 <= start <= stop:
            raise ValueError(f"bad id range [{start}, {stop})")
        out = np.empty((stop - start, self.dim), dtype=np.float32)  # (n, d)
        for block in range(start // ROWS_PER_BLOCK, -(-stop // ROWS_PER_BLOCK)):
            base = block * ROWS_PER_BLOCK
            lo, hi = max(start, base), min(stop, base + ROWS_PER_BLOCK)
            out[lo - start : hi - start] = self._block(block)[lo - base : hi - base]
        return out

    def queries(self, count: int, seed: int) -> np.ndarray:
        """(count, d) fresh vectors from the same mixture (not rows of the corpus)."""
        return self._sample(np.random.default_rng([self.seed, 2, seed]), count)


def synthetic_passages(count: int) -> Iterator[Passage]:
    """Passages 0..count-1 with placeholder text, to pair with a MixtureEncoder."""
    return (Passage(i, "", f"synthetic passage {i}") for i in range(count))
