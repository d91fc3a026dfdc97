"""The per-worker Ray Train loop: retrieve top-K with vectors, RAG loss, DDP step, report, refresh."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cluster.fusion import RetrievalConfig
from services.rag.checkpoint import TrainState
from services.rag.precision import resolve_dtype
from services.rag.retrieval import DENSE, Search, closed_book_search, retrieve
from training.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from training.config import OptimizerConfig, RefreshSchedule, TrainConfig
from training.data import QAExample
from training.modules import RagTrainModule, apply_compute, build_train_module
from training.tasks import get_task

logger = logging.getLogger(__name__)


def global_batch(num_examples: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of 0-based `step`: a stream of seeded per-epoch permutations."""
    indices, perms = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng(seed + epoch).permutation(num_examples)
        indices.append(int(perms[epoch][offset]))
    return indices


def local_slice(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    bounds = np.linspace(0, len(indices), world_size + 1).round().astype(int)
    return list(indices[bounds[rank] : bounds[rank + 1]])


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc): activations of differently sized
    batches otherwise fragment it, and a worker's memory creeps up step after step."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def memory_mb() -> dict[str, float]:
    """This worker's resident memory now and at its peak, in MiB."""
    import psutil

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "rss_mb": round(psutil.Process().memory_info().rss / 2**20),
        "peak_rss_mb": round(peak_kib / 1024),
    }


def share_weight(share: int, world: int, batch_size: int) -> float:
    """The factor on a worker's mean loss that makes DDP's average of the workers' gradients the
    gradient of the global-batch mean, also when the shares differ in size: share / (batch / world)."""
    return share * world / batch_size


def make_optimizer(module: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the query encoder's at `query_encoder_lr` when set."""
    encoder = {id(p) for p in unwrap(module).rag.query_encoder.parameters()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in encoder]},
        {"params": [p for p in trainable if id(p) in encoder], "lr": cfg.query_encoder_lr or cfg.lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)


def freeze_retriever(module: RagTrainModule, cfg: TrainConfig, rank: int) -> None:
    """Freeze the query encoder when the config does not train it, and say so once (rank 0)."""
    if cfg.trains_query_encoder:
        return
    module.rag.query_encoder.requires_grad_(False)
    if rank == 0:
        why = (
            "BM25's doc scores carry no gradient"
            if cfg.retrieval.retriever == "bm25"
            else "train_query_encoder: false"
        )
        logger.info(f"[train {cfg.name}] the query encoder is frozen ({why})")


def unwrap(module: torch.nn.Module) -> RagTrainModule:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def actor_search(shard_group: Any) -> Search:
    """Search through a ShardGroup actor handle (what the workers hold)."""
    return lambda queries, questions, k, parts: ray.get(
        shard_group.search_retrievers.remote(queries, questions, k, parts, return_vectors=True)
    )


def forward_backward(
    module: torch.nn.Module,
    search: Search,
    examples: Sequence[QAExample],
    n_docs: int,
    weight: float,
    dtype: torch.dtype = torch.float32,
    retrieval: RetrievalConfig = DENSE,
) -> tuple[torch.Tensor, str]:
    """Retrieve, compute `weight` × local mean loss (autocast to `dtype`), backward. Returns
    (detached loss, version).

    The autocast is mixed-precision training arithmetic: the weights and their gradients stay float32.
    (Inference stores the weights in its precision instead: `services.rag.loading.load_rag`.)

    The module recomputes the doc scores with gradient from the retrieved document vectors.
    `weight` = local batch / (global batch / world size) makes DDP's gradient average equal
    the gradient of the global-batch mean even when the local shares differ in size.
    """
    questions = [e.input for e in examples]
    answers = [e.answers[0] for e in examples]
    rag = unwrap(module).rag
    found = retrieve(
        rag.query_encoder,
        search,
        questions,
        n_docs,
        rag.doc_score_scale,
        keep_vectors=True,
        retrieval=retrieval,
    )
    fixed = found.doc_scores if retrieval.retriever == "bm25" else None  # BM25's logits: no gradient
    device = rag.generator.device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = module(questions, answers, found.titles, found.texts, found.vectors, fixed) * weight
    loss.backward()
    return loss.detach(), found.version


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    search: Search,
    examples: Sequence[QAExample],
    cfg: TrainConfig,
    weight: float = 1.0,
) -> tuple[torch.Tensor, str]:
    """One optimiser step: retrieve, loss, backward (DDP syncs), clip, update."""
    dtype = resolve_dtype(cfg.compute.precision)
    loss, version = forward_backward(model, search, examples, cfg.n_docs, weight, dtype, cfg.retrieval)
    if cfg.optimizer.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    release_free_memory()
    return loss, version


def mean_over_workers(value: torch.Tensor) -> float:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def _history(path: str, rank: int, row: dict) -> None:
    if rank == 0:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")


def _restore(module: RagTrainModule, refresher: Any, rank: int) -> tuple[TrainState | None, str | None]:
    """Weights from Ray Train's latest checkpoint (if resuming); the shard group back on its version."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(directory, module.modules_to_save())
    if rank == 0:
        ray.get(refresher.restore.remote(state.index_version))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return state, checkpoint.path


def _save_and_report(
    module: RagTrainModule, optimizer: torch.optim.Optimizer, cfg: TrainConfig, metrics: dict, rank: int
) -> None:
    if rank != 0:
        ray.train.report(metrics)
        return
    state = TrainState(
        step=metrics["step"],
        index_version=metrics["index_version"],
        models=cfg.models.names(),
        doc_encoder_trained=cfg.train_doc_encoder,
    )
    with tempfile.TemporaryDirectory(prefix="rayrag-ckpt-") as directory:
        save_checkpoint(directory, module.modules_to_save(), optimizer, state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"step-{metrics['step']:06d}",
        )


def _snapshot(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in encoder.state_dict().items()}


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. loop_config: config (TrainConfig), shard_group and refresher (actor
    handles), history (path of the JSONL loss log rank 0 appends to)."""
    cfg: TrainConfig = loop_config["config"]
    logging.basicConfig(format="%(message)s", level=logging.INFO, force=True)  # a worker's own process
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.schedule.seed + rank)
    module = build_train_module(cfg.models, cfg.mode, cfg.train_doc_encoder).train()
    apply_compute(module, cfg.compute)
    freeze_retriever(module, cfg, rank)
    state, checkpoint_path = _restore(module, loop_config["refresher"], rank)
    model = ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer = make_optimizer(model, cfg.optimizer)
    if state is not None:
        with ray.train.get_checkpoint().as_directory() as directory:
            load_optimizer_state(directory, optimizer)
    examples = get_task(cfg.task).load(cfg.data.train)
    _run_steps(model, optimizer, cfg, examples, loop_config, rank, world, state, checkpoint_path)


def _run_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    examples: list[QAExample],
    loop_config: dict,
    rank: int,
    world: int,
    state: TrainState | None,
    resumed_from: str | None,
) -> None:
    refresher, history = loop_config["refresher"], loop_config["history"]
    search = closed_book_search if cfg.closed_book else actor_search(loop_config["shard_group"])
    schedule, sched = RefreshSchedule.parse(cfg.refresh), cfg.schedule
    start = state.step if state is not None else 0
    pids = [os.getpid()] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(pids, os.getpid())
    _history(
        history,
        rank,
        {"event": "start", "step": start, "world_size": world, "pids": pids, "resumed_from": resumed_from},
    )
    log_every, began = max(1, sched.steps // 100), time.monotonic()
    for step in range(start, sched.steps):
        ticked = time.monotonic()
        share = local_slice(global_batch(len(examples), step, sched.batch_size, sched.seed), rank, world)
        weight = share_weight(len(share), world, sched.batch_size)
        loss, version = train_step(model, optimizer, search, [examples[i] for i in share], cfg, weight)
        done, seconds = step + 1, time.monotonic() - ticked
        metrics = {
            "step": done,
            "loss": mean_over_workers(loss),
            "index_version": version,
            "step_seconds": seconds,
            "world_size": world,
            **memory_mb(),
        }
        if rank == 0 and cfg.train_doc_encoder and schedule.is_refresh_step(done):
            refresher.request.remote(done, _snapshot(unwrap(model).doc_encoder))
        _history(history, rank, metrics | {"time": time.time()})
        if rank == 0 and (done % log_every == 0 or done == sched.steps):
            logger.info(
                f"[train {cfg.name}] step {done}/{sched.steps} loss {metrics['loss']:.4f} "
                f"index {version} workers {world} {seconds:.2f}s/step "
                f"memory {metrics['rss_mb']} MiB (peak {metrics['peak_rss_mb']}) "
                f"elapsed {time.monotonic() - began:.0f}s"
            )
        if done % sched.checkpoint_every == 0 or done == sched.steps:
            # reports are collective and wait on the controller: only at checkpoints, the
            # per-step metrics go to the history file and the progress line
            _save_and_report(unwrap(model), optimizer, cfg, metrics, rank)
