"""The training config: typed pydantic models loaded from YAML, validated before any worker starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import ConfigDict, Field, field_validator, model_validator

from cluster.config import Config
from cluster.fusion import RetrievalConfig
from cluster.index_config import IndexConfig
from services.rag.config import Mode, ModelsConfig
from services.rag.precision import Precision
from training.data import BUILTIN_DATA, split_spec

TaskName = Literal["qa", "qgen", "classify"]  # training/tasks.py defines each
TASKS: tuple[TaskName, ...] = get_args(TaskName)


class Section(Config):
    """A frozen part of the training config."""

    model_config = ConfigDict(frozen=True)


class DataConfig(Section):
    train: str  # the task's data: JSONL, SQuAD json, "squad-dev" (either with ":train" / ":test") or "claims"
    eval: str | None = None

    @field_validator("train", "eval")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        source = None if value is None else split_spec(value)[0]
        if source not in (None, *BUILTIN_DATA) and not Path(source).is_file():
            raise ValueError(f"no such file {source!r}")
        return value


class OptimizerConfig(Section):
    lr: float = Field(1e-5, gt=0)
    query_encoder_lr: float | None = Field(None, gt=0)  # None: lr (a small one keeps retrieval stable)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 disables clipping


class ComputeConfig(Section):
    """What a step costs: the arithmetic (bfloat16 autocast where native: 2x faster on AMX CPUs), how
    much of the generator learns, and activations recomputed in the backward instead of kept."""

    precision: Precision = "auto"
    train_generator_layers: int | None = Field(None, ge=0)  # the top N decoder blocks (None: all)
    gradient_checkpointing: bool = False


class ScheduleConfig(Section):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # global batch: split across the workers of a step
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 0


class ScalingSection(Section):
    num_workers: int | list[int] = 1  # fixed, or [min, max] for elastic training
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)

    @field_validator("num_workers", mode="before")
    @classmethod
    def _worker_range(cls, value: Any) -> Any:
        bounds = [value, value] if type(value) is int else value
        if not (
            isinstance(bounds, list)
            and len(bounds) == 2
            and all(type(b) is int for b in bounds)
            and 1 <= bounds[0] <= bounds[1]
        ):
            raise ValueError(f"must be n >= 1 or [min, max] with 1 <= min <= max, got {value!r}")
        return value

    @property
    def worker_range(self) -> tuple[int, int]:
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        return self.num_workers[0], self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)


class TrainConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # the run folder under storage_path
    storage_path: str
    data: DataConfig
    index: IndexConfig
    schedule: ScheduleConfig
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    n_docs: int = Field(5, ge=1)
    mode: Mode = "sequence"  # RAG-Sequence or RAG-Token loss
    task: TaskName = "qa"  # the data's input -> target format (training/tasks.py)
    refresh: str = ""  # "0-1000:100,1000-:500"; empty: never
    train_doc_encoder: bool = False
    train_query_encoder: bool = True  # false: the frozen-retriever baseline (the paper's Table 6)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)  # dense, bm25 or hybrid
    closed_book: bool = False  # no retrieval: one empty passage per question (the paper's baseline)
    max_failures: int = Field(0, ge=-1)

    @model_validator(mode="after")
    def _check_across_keys(self) -> TrainConfig:
        most = self.scaling.worker_range[1]
        if self.schedule.batch_size < most:
            raise ValueError(
                f"config key 'schedule.batch_size' ({self.schedule.batch_size}) must be "
                f">= the most workers ({most})"
            )
        RefreshSchedule.parse(self.refresh)
        if self.closed_book and (self.n_docs != 1 or self.train_doc_encoder):
            raise ValueError("config key 'closed_book' needs n_docs: 1 and no train_doc_encoder")
        if self.train_doc_encoder and self.retrieval.retriever == "bm25":
            raise ValueError("config key 'train_doc_encoder' needs a dense or hybrid retrieval.retriever")
        return self

    def training_record(self, *leave_out: str) -> dict:
        """The config as JSON less `models.precision` (the weights when the model answers; training
        never reads it) and the top-level keys `leave_out` names: what a run's checkpoints depend on."""
        return self.model_dump(
            mode="json", exclude={"models": {"precision"}, **dict.fromkeys(leave_out, True)}
        )

    @property
    def trains_query_encoder(self) -> bool:
        """False for a frozen retriever: train_query_encoder off, or BM25 (its scores carry no gradient)."""
        return self.train_query_encoder and self.retrieval.retriever != "bm25"


class RefreshSchedule:
    """Steps → refresh interval, from "START-END:EVERY,..." (END empty: open-ended).

    "0-1000:100,1000-:500" refreshes at steps 100, 200, ..., 1000, 1500, 2000, ...: a step s
    refreshes when START < s <= END for a range (END empty: no upper bound) and s - START is a
    multiple of EVERY. Ranges must be ordered and must not overlap (one may start where the one
    before ends). The empty string never refreshes.
    """

    def __init__(self, ranges: list[tuple[int, int | None, int]]) -> None:
        self.ranges = ranges

    @classmethod
    def parse(cls, spec: str) -> RefreshSchedule:
        ranges: list[tuple[int, int | None, int]] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            match = re.fullmatch(r"(\d+)-(\d*):(\d+)", part)
            if match is None:
                raise ValueError(f"config key 'refresh': bad range {part!r}, expected START-END:EVERY")
            start, end, every = int(match[1]), int(match[2]) if match[2] else None, int(match[3])
            if every < 1 or (end is not None and end <= start):
                raise ValueError(f"config key 'refresh': empty range or interval in {part!r}")
            if ranges and (ranges[-1][1] is None or start < ranges[-1][1]):
                raise ValueError(f"config key 'refresh': range {part!r} overlaps the one before")
            ranges.append((start, end, every))
        return cls(ranges)

    def is_refresh_step(self, step: int) -> bool:
        """True when training should refresh the index after finishing `step` (1-based)."""
        for start, end, every in self.ranges:
            if start < step and (end is None or step <= end):
                return (step - start) % every == 0
        return False


def config_from_dict(raw: dict) -> TrainConfig:
    """A validated training config; a ValueError names the first bad key."""
    return TrainConfig.parse(raw)


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training config; relative data paths resolve from its folder."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such config file {str(path)!r}")
    raw = yaml.safe_load(path.read_text())
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        for key in ("train", "eval"):
            if isinstance(raw["data"].get(key), str):
                raw["data"][key] = _resolve(raw["data"][key], path.parent)
    return config_from_dict(raw)


def _resolve(spec: str, folder: Path) -> str:
    """A data spec with its file resolved from `folder` (the split suffix kept)."""
    source, split = split_spec(spec)
    if source in BUILTIN_DATA:
        return spec
    return str((folder / source).resolve()) + (f":{split}" if split else "")
