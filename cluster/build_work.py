"""A streaming build's work directory on storage: chunk files, the trained template, finished shard
files and one marker per finished step (the journal), plus a worker's peak private memory."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from cluster import storage

STEPS = "steps"


class WorkDir:
    """Names of the files under one build's work location (a local path or a URI)."""

    def __init__(self, location: str) -> None:
        self.location = str(location)

    def path(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    def chunk_vectors(self, chunk: int) -> str:
        return self.path("chunks", f"vectors-{chunk:06d}.npy")

    def chunk_passages(self, chunk: int) -> str:
        return self.path("chunks", f"passages-{chunk:06d}.jsonl")

    def template(self) -> str:
        return self.path("template.faiss")

    def shard_file(self, name: str) -> str:
        return self.path("shards", name)

    def done(self) -> dict[str, dict]:
        """Finished steps (name → what the step recorded), read from their marker files."""
        names = [n for n in storage.list_names(self.path(STEPS)) if n.endswith(".json")]
        return {n[: -len(".json")]: json.loads(storage.read_bytes(self.path(STEPS, n))) for n in names}

    def record(self, step: str, info: dict) -> None:
        """Mark `step` finished; call only once its files are complete."""
        storage.write_bytes(self.path(STEPS, f"{step}.json"), json.dumps(info).encode())


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def read_npy(location: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(location)), allow_pickle=False)


def write_chunk(
    work: WorkDir,
    chunk: int,
    vectors: np.ndarray,
    ids: Sequence[int],
    titles: Sequence[str],
    texts: Sequence[str],
) -> None:
    """A chunk's (n, d) vectors and its passages (one JSON [id, title, text] per line)."""
    lines = (
        json.dumps([int(i), t, x], ensure_ascii=False) for i, t, x in zip(ids, titles, texts, strict=True)
    )
    storage.write_bytes(work.chunk_passages(chunk), ("\n".join(lines) + "\n").encode("utf-8"))
    storage.write_bytes(work.chunk_vectors(chunk), npy_bytes(np.ascontiguousarray(vectors, np.float32)))


def read_passages(work: WorkDir, chunk: int) -> Iterator[tuple[int, str, str]]:
    for line in storage.read_bytes(work.chunk_passages(chunk)).decode("utf-8").splitlines():
        passage_id, title, text = json.loads(line)
        yield int(passage_id), title, text


def pieces(start: int, stop: int, chunk_rows: int) -> Iterator[tuple[int, int, int]]:
    """(chunk, first row in it, end row in it) covering global rows [start, stop)."""
    for chunk in range(start // chunk_rows, -(-stop // chunk_rows)):
        base = chunk * chunk_rows
        yield chunk, max(start, base) - base, min(stop, base + chunk_rows) - base


def reset_peak_memory() -> None:
    """Start this process's peak-RSS count afresh (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_private_bytes() -> int:
    """Peak private memory since `reset_peak_memory`: VmHWM less the file-backed and shared pages
    resident now (libraries, mapped files), which count in VmHWM but are not this worker's own."""
    fields: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "RssFile", "RssShmem"):
                fields[name] = int(rest.split()[0]) * 1024
    return fields["VmHWM"] - fields["RssFile"] - fields["RssShmem"]


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else f"pid-{os.getpid()}"


def sample_rows(count: int, wanted: int, seed: int) -> np.ndarray:
    """`wanted` distinct row numbers of [0, count), sorted, the same for the same seed."""
    rows = np.random.default_rng(seed).choice(count, size=min(wanted, count), replace=False)
    return np.sort(rows)


def gather_rows(work: WorkDir, chunk_rows: int, rows: np.ndarray) -> np.ndarray:
    """(len(rows), d) vectors of sorted global `rows`, reading one chunk file at a time."""
    parts = []
    for chunk in np.unique(rows // chunk_rows):
        wanted = rows[rows // chunk_rows == chunk] - chunk * chunk_rows
        parts.append(read_npy(work.chunk_vectors(int(chunk)))[wanted])
    return np.concatenate(parts)
