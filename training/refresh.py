"""Index refresh beside training: snapshot the document encoder, re-encode, build version N+1, swap."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from cluster.bootstrap import IndexSpec
from cluster.encode_pool import encode_on_ray
from cluster.encoders import TextEncoder
from cluster.index_build import build_index_from_vectors
from cluster.index_store import publish
from cluster.passages import passage_text

NICENESS = 10


@dataclass(frozen=True)
class RefreshConfig:
    index: IndexSpec  # the root, the corpus every version indexes, the document encoder's architecture
    num_encoders: int = 0  # 0: encode inside the refresher (niced, loaded once); N: a pool of N Ray encoders


class IndexRefresher:
    """A plain class made a threaded Ray actor by the trainer; workers call it by handle.

    `request` returns at once: the build runs on a thread of this actor (encoding here at low
    priority, or on a pool of Ray encoder actors), so the training workers keep stepping
    against the current version. When the build finishes the
    version is published and the shard group swaps to it. One build at a time: a request that
    arrives while one runs is skipped (the next scheduled one carries newer weights anyway).
    `restore` (on resume from a checkpoint) drops any build begun from newer weights and puts
    the shard group back on the checkpoint's version.
    """

    def __init__(self, config: RefreshConfig, shard_group: Any) -> None:
        self.config, self.shard_group = config, shard_group
        self.passages = config.index.passages()
        self.encoder: TextEncoder | None = None  # loaded by the first in-actor refresh
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._error: BaseException | None = None
        self.refreshes: list[dict] = []
        self.skipped: list[int] = []

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("index refresh failed") from error

    def request(self, step: int, encoder_state: dict[str, torch.Tensor]) -> bool:
        """Start building a version from these document-encoder weights; False when busy."""
        with self._lock:
            self._raise_pending()
            if self._thread is not None and self._thread.is_alive():
                self.skipped.append(step)
                return False
            self._thread = threading.Thread(
                target=self._build,
                args=(step, encoder_state, self._generation),
                name=f"refresh-{step}",
                daemon=True,
            )
            self._thread.start()
            return True

    def _build(self, step: int, encoder_state: dict[str, torch.Tensor], generation: int) -> None:
        started = time.monotonic()
        try:
            version = self._encode_and_write(encoder_state)
            with self._lock:
                if generation != self._generation:
                    return  # a resume moved back to an older checkpoint: these weights are gone
                publish(self.config.index.root, version)
                ray.get(self.shard_group.swap.remote(version))
                self.refreshes.append(
                    {"step": step, "version": version, "seconds": round(time.monotonic() - started, 3)}
                )
        except BaseException as error:  # surfaced to the next caller of request/status/wait
            self._error = error

    def _encode(self, encoder_state: dict[str, torch.Tensor]) -> tuple[np.ndarray, str, str]:
        """(N, d) vectors of the corpus under these weights, with the encoder's name and fingerprint:
        on a pool of Ray encoders, or on this thread at low priority with an encoder loaded once."""
        texts = [passage_text(p) for p in self.passages]
        if self.config.num_encoders > 0:
            vectors, (name, _, fingerprint) = encode_on_ray(
                texts,
                self.config.index.encoder,
                num_encoders=self.config.num_encoders,
                encoder_threads=1,  # one CPU each, beside training
                encoder_state=encoder_state,
                show_progress=False,
            )
            return vectors, name, fingerprint
        os.nice(NICENESS)  # Linux nice is per thread: this build thread yields to training
        torch.set_num_threads(1)
        if self.encoder is None:
            self.encoder = TextEncoder.from_pretrained(self.config.index.encoder).eval()
        self.encoder.load_state_dict(encoder_state)
        return self.encoder.encode(texts), self.encoder.name, self.encoder.fingerprint()  # (N, d)

    def _encode_and_write(self, encoder_state: dict[str, torch.Tensor]) -> str:
        """A new unpublished version of the corpus under these document-encoder weights."""
        vectors, encoder, fingerprint = self._encode(encoder_state)
        return build_index_from_vectors(
            vectors,
            self.passages,
            self.config.index.root,
            shards=self.config.index.shards,
            encoder=encoder,
            encoder_fingerprint=fingerprint,
            publish=False,
        )

    def restore(self, version: str) -> None:
        """Resume: forget in-flight builds, publish and serve `version` again."""
        with self._lock:
            self._generation += 1
            publish(self.config.index.root, version)
            if ray.get(self.shard_group.health.remote())["version"] != version:
                ray.get(self.shard_group.swap.remote(version))

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the running build (if any) is done; return `status()`."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status()

    def status(self) -> dict:
        with self._lock:
            self._raise_pending()
            building = self._thread is not None and self._thread.is_alive()
            return {"building": building, "refreshes": list(self.refreshes), "skipped": list(self.skipped)}
