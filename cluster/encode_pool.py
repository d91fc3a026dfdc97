"""Encoding a corpus on Ray: a pool of document-encoder actors sized to the cluster's CPUs."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

    from cluster.encoders import TextEncoder
    from cluster.synthetic import MixtureEncoder

log = logging.getLogger(__name__)

WAIT_S = 5.0  # no encoder placed after this long: say which resources it waits for
REPEAT_S = 30.0  # and say it again this often
CHUNK_BATCHES = 8  # batches per task sent to an actor


class EncoderPlan(NamedTuple):
    """How many encoder actors, torch threads in each, and the CPUs each reserves on Ray."""

    actors: int
    threads: int
    cpus: float


def plan_encoders(
    free_cpus: float,
    max_actors: int,
    actors: int | None = None,
    threads: int | None = None,
    cpus: float | None = None,
) -> EncoderPlan:
    """Fill in what is not given so that actors × threads = the CPUs Ray has free (all of them on an
    idle cluster), with no more actors than tasks (`max_actors`); each actor reserves its threads
    unless `cpus` says otherwise. Sized to the free CPUs, a build beside running work starts at once;
    with none free, one actor waits for one CPU."""
    for name, value in (("encoders", actors), ("encoder threads", threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")
    if cpus is not None and cpus < 0:
        raise ValueError(f"encoder CPUs must be ≥ 0, got {cpus}")
    total = max(1, int(free_cpus))
    if actors is None:
        actors = max(1, min(total // (threads or 1), max_actors))
    threads = threads or max(1, total // actors)
    if cpus is None:  # its threads, or all that is free when that is under one CPU
        cpus = float(threads) if free_cpus >= 1 else free_cpus or 1.0
    return EncoderPlan(actors, threads, cpus)


class EncoderWorker:
    """Holds one document encoder; made a Ray actor by `encode_on_ray`. Construction is cheap, so
    an actor that has answered `started` is placed; `load` then loads the model."""

    encoder: TextEncoder | MixtureEncoder  # set by `load`

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def started(self) -> bool:
        return True

    def load(self, encoder: str, encoder_state: dict | None) -> tuple[str, int, str]:
        """Load the encoder (optionally with trained weights); returns (name, dim, fingerprint).
        A `synthetic:…` name loads a `MixtureEncoder` (vectors from passage ids, no model)."""
        from cluster.synthetic import PREFIX, MixtureEncoder

        if encoder.startswith(PREFIX):
            self.encoder = MixtureEncoder.parse(encoder)
            return self.encoder.name, self.encoder.dim, self.encoder.fingerprint()
        import torch

        from cluster.encoders import TextEncoder

        # Ray may count more CPUs on this node than it has cores
        torch.set_num_threads(min(self.threads, len(os.sched_getaffinity(0))))
        self.encoder = TextEncoder.from_pretrained(encoder)
        if encoder_state is not None:
            self.encoder.load_state_dict(encoder_state)
        self.encoder.eval()
        return self.encoder.name, int(self.encoder.dim), self.encoder.fingerprint()

    def token_lengths(self, texts: list[str]) -> np.ndarray:
        return self.encoder.token_lengths(texts)  # (n,)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self.encoder.encode(texts, batch_size=batch_size)  # (n, d) float32

    def write_chunk(
        self, work: str, chunk: int, ids: list[int], titles: list[str], texts: list[str], batch_size: int
    ) -> dict:
        """Encode one chunk and write its vector and passage files under `work` (a streaming build);
        returns the rows, seconds and this worker's peak private bytes."""
        from cluster.build_work import WorkDir, peak_private_bytes, reset_peak_memory
        from cluster.build_work import write_chunk as write_files
        from cluster.synthetic import MixtureEncoder

        reset_peak_memory()
        began = time.monotonic()
        if isinstance(self.encoder, MixtureEncoder):  # vectors from ids: ids of a chunk are contiguous
            vectors = self.encoder.vectors(ids[0], ids[-1] + 1)  # (n, d)
        else:
            vectors = self.encoder.encode(texts, batch_size=batch_size)  # (n, d)
        write_files(WorkDir(work), chunk, vectors, ids, titles, texts)
        return {"rows": len(ids), "seconds": time.monotonic() - began, "peak_private": peak_private_bytes()}


def waiting_message(plan: EncoderPlan, free_cpus: float, total_cpus: float) -> str:
    """What an encoder pool with no actor placed waits for, and the options that change it."""
    fit = math.floor(100 * free_cpus / plan.actors) / 100  # CPUs per actor that would let all start
    if fit == 0:
        hint = "--encoder-cpus 0 (the encoders then share the busy CPUs)"
    elif fit < plan.cpus:
        hint = f"--encoder-cpus {fit:g} (fractions are allowed) or fewer --encoders"
    else:
        hint = "a lower --encoder-cpus (fractions are allowed) or fewer --encoders"
    return (
        f"waiting for CPUs: {plan.actors} encoder actor(s) asking for {plan.cpus:g} CPU each, none started; "
        f"Ray has {free_cpus:g} of {total_cpus:g} CPUs free. To start now, pass {hint} to "
        f"rayrag index build, or free CPUs"
    )


def _wait_until_placed(workers: Sequence[ActorHandle], plan: EncoderPlan) -> None:
    """Return once any actor is placed; until then log what they wait for, first after WAIT_S."""
    import ray

    started = [worker.started.remote() for worker in workers]
    timeout = WAIT_S
    while not ray.wait(started, num_returns=1, timeout=timeout)[0]:
        free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
        log.warning(waiting_message(plan, free, total))
        timeout = REPEAT_S


def _length_order(worker: ActorHandle, texts: Sequence[str]) -> np.ndarray:
    """Row order longest first (by tokens), so batches pad little and the last tasks are short."""
    import ray

    lengths = ray.get(worker.token_lengths.remote(list(texts)))  # (N,)
    return np.argsort(-lengths, kind="stable")


def _run_tasks(
    first: ActorHandle,
    loading: dict[ObjectRef, ActorHandle],
    chunks: list[list[str]],
    batch_size: int,
    progress: tqdm,
) -> list[np.ndarray]:
    """Encode every chunk on whichever actors are loaded; actors still loading join when ready."""
    import ray

    results: list[np.ndarray] = [np.empty(0)] * len(chunks)
    todo, idle = deque(range(len(chunks))), [first]
    running: dict[ObjectRef, tuple[ActorHandle, int]] = {}
    while todo or running:
        while idle and todo:
            worker, index = idle.pop(), todo.popleft()
            running[worker.encode.remote(chunks[index], batch_size)] = (worker, index)
        [done], _ = ray.wait([*running, *loading], num_returns=1)
        if done in loading:
            ray.get(done)
            idle.append(loading.pop(done))
            continue
        worker, index = running.pop(done)
        results[index] = ray.get(done)
        idle.append(worker)
        progress.update(len(chunks[index]))
    return results


def encode_on_ray(
    texts: Sequence[str],
    encoder: str,
    *,
    num_encoders: int | None = None,
    encoder_threads: int | None = None,
    encoder_cpus: float | None = None,
    batch_size: int = 16,
    encoder_state: dict | None = None,
    show_progress: bool = True,
    check_dim: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, tuple[str, int, str]]:
    """Encode texts with a pool of encoder actors; returns ((N, d) vectors in the order of `texts`,
    (name, dim, fingerprint)). See `plan_encoders` for the pool's defaults.

    `check_dim(dim)` runs once the encoder's dim is known, before any text is encoded.
    """
    import ray

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if not texts:
        raise ValueError("no texts to encode")
    chunk = batch_size * CHUNK_BATCHES
    plan = plan_encoders(
        ray.available_resources().get("CPU", 0.0),
        -(-len(texts) // chunk),
        num_encoders,
        encoder_threads,
        encoder_cpus,
    )
    state = ray.put(encoder_state) if encoder_state is not None else None
    actor = ray.remote(EncoderWorker).options(num_cpus=plan.cpus)
    workers = [actor.remote(plan.threads) for _ in range(plan.actors)]
    try:
        _wait_until_placed(workers, plan)
        began = time.monotonic()  # the rate below counts loading and encoding, not waiting for CPUs
        loading = {worker.load.remote(encoder, state): worker for worker in workers}
        [first_ref], _ = ray.wait(list(loading), num_returns=1)
        info, first = ray.get(first_ref), loading.pop(first_ref)
        if check_dim is not None:
            check_dim(info[1])
        order = _length_order(first, texts)
        chunks = [[texts[i] for i in order[s : s + chunk]] for s in range(0, len(texts), chunk)]
        desc = f"encoding (encoder actors: {plan.actors}, threads each: {plan.threads})"
        with tqdm(total=len(texts), desc=desc, unit="passage", disable=not show_progress) as progress:
            parts = _run_tasks(first, loading, chunks, batch_size, progress)
    finally:
        for worker in workers:
            ray.kill(worker)
    seconds = time.monotonic() - began
    log.info(
        "encoded %d passages in %.1f s: %.1f passages/s (encoder actors: %d, threads each: %d)",
        len(texts),
        seconds,
        len(texts) / seconds,
        plan.actors,
        plan.threads,
    )
    vectors = np.empty((len(texts), info[1]), dtype=np.float32)  # (N, d)
    vectors[order] = np.concatenate(parts)
    return vectors, info
