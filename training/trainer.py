"""Launching a training run: index v1 if needed, shard group + refresher actors, TorchTrainer, fit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster.bootstrap import IndexSpec, ensure_index
from cluster.index_store import load_manifest
from cluster.shard_group import ShardGroup
from services.rag.checkpoint import STATE, read_state
from training.config import TrainConfig
from training.loop import train_loop_per_worker
from training.refresh import IndexRefresher, RefreshConfig
from training.stages import config_changes
from training.tasks import get_task

SHARD_GROUP_CONCURRENCY = 16  # searches from every worker + a swap + health checks
RUN_CONFIG = "config.json"  # the run folder's record of the config its checkpoints were trained with
RESUMABLE_CHANGES = ("scaling", "max_failures")  # where and how robustly a run goes, not what it learns


@dataclass
class TrainOutcome:
    result: Any  # ray.train.Result
    history: Path  # JSONL: one row per step (loss, index version, step time)
    refresh: dict  # the refresher's status: versions built, steps skipped


def prepare_index(cfg: TrainConfig) -> str:
    """The published index version to start from (built from the corpus when there is none).

    Checks n_docs against the index size before any worker starts."""
    version = ensure_index(IndexSpec.of(cfg.index, cfg.models.doc_encoder))
    count = load_manifest(cfg.index.index_root, version).count
    if cfg.n_docs > count:
        raise ValueError(
            f"n_docs={cfg.n_docs} is larger than index {version} at {cfg.index.index_root!r} "
            f"({count} passages)"
        )
    return version


def run_config(cfg: TrainConfig) -> dict:
    """The part of the config a resumed run must share with the run that wrote the checkpoints."""
    return cfg.training_record(*RESUMABLE_CHANGES)


def check_resumable(cfg: TrainConfig) -> None:
    """A run folder that already holds checkpoints is resumed: refuse one from other models, or one
    whose recorded config differs (parameter shapes are checked again when the workers load it)."""
    run_dir = Path(cfg.storage_path).resolve() / cfg.name
    states = sorted(run_dir.glob(f"step-*/{STATE}"))
    if not states:
        return
    state = read_state(states[-1].parent)
    wanted = {**cfg.models.names(), "doc_encoder_trained": cfg.train_doc_encoder}
    found = {**state.models, "doc_encoder_trained": state.doc_encoder_trained}
    for key, value in wanted.items():
        if found.get(key) != value:
            raise ValueError(
                f"incompatible checkpoint {str(states[-1].parent)!r}: it has {key}={found.get(key)!r}, "
                f"the config asks for {value!r} (use another run name to start afresh)"
            )
    recorded = run_dir / RUN_CONFIG
    changes = (
        config_changes(json.loads(recorded.read_text()), run_config(cfg))
        if recorded.is_file()
        else [f"the run records no config ({RUN_CONFIG})"]
    )
    if changes:
        raise ValueError(
            f"will not resume {str(states[-1].parent)!r}: {'; '.join(changes)} "
            "(use another run name, or delete the run folder, to start afresh)"
        )


def launch_retrieval(cfg: TrainConfig, version: str) -> tuple[Any, Any]:
    """The shard group actor (workers search it) and the refresher actor that swaps it."""
    group = ray.remote(ShardGroup).options(max_concurrency=SHARD_GROUP_CONCURRENCY, num_cpus=0)
    shard_group = group.remote(cfg.index, version)
    refresh = RefreshConfig(IndexSpec.of(cfg.index, cfg.models.doc_encoder), cfg.index.refresh_encoders)
    refresher = ray.remote(IndexRefresher).options(max_concurrency=4, num_cpus=0).remote(refresh, shard_group)
    return shard_group, refresher


def make_trainer(
    cfg: TrainConfig, loop_config: dict, resources_per_worker: dict | None = None
) -> TorchTrainer:
    low, high = cfg.scaling.worker_range
    scaling = ScalingConfig(
        num_workers=(low, high) if cfg.scaling.elastic else low,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=resources_per_worker or {"CPU": cfg.scaling.cpus_per_worker},
        elastic_resize_monitor_interval_s=5.0,
    )
    run = RunConfig(
        name=cfg.name,
        storage_path=str(Path(cfg.storage_path).resolve()),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling, run_config=run
    )


def run_training(cfg: TrainConfig, resources_per_worker: dict | None = None) -> TrainOutcome:
    """Fit under Ray (already initialised); wait for a refresh in flight before returning."""
    get_task(cfg.task).load(cfg.data.train)  # every record checked before a worker starts
    check_resumable(cfg)
    version = prepare_index(cfg)
    shard_group, refresher = launch_retrieval(cfg, version)
    history = Path(cfg.storage_path).resolve() / cfg.name / "history.jsonl"
    history.parent.mkdir(parents=True, exist_ok=True)
    (history.parent / RUN_CONFIG).write_text(json.dumps(run_config(cfg), indent=1))
    loop_config = {"config": cfg, "shard_group": shard_group, "refresher": refresher, "history": str(history)}
    try:
        result = make_trainer(cfg, loop_config, resources_per_worker).fit()
        refresh = ray.get(refresher.wait.remote())
    finally:
        ray.get(shard_group.close.remote())
        for actor in (refresher, shard_group):
            ray.kill(actor)
    return TrainOutcome(result=result, history=history, refresh=refresh)
