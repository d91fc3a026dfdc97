"""The training config: typed dataclasses loaded from YAML, validated before any worker starts."""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VARIANTS = ("sequence", "token")
BUILTIN_QA = "squad-dev"          # load_qa's name for SQuAD v1.1 dev


@dataclass(frozen=True)
class DataConfig:
    train: str                    # JSONL {question, answers}, SQuAD json, or "squad-dev"
    eval: str | None = None

    def __post_init__(self) -> None:
        for key in ("train", "eval"):
            value = getattr(self, key)
            if value not in (None, BUILTIN_QA) and not Path(value).is_file():
                raise ValueError(f"config key 'data.{key}': no such file {value!r}")


@dataclass(frozen=True)
class IndexConfig:
    root: str                     # INDEX_ROOT with v000N/ versions and a published pointer
    corpus: str = "default"       # load_corpus spec, used for the first build and for refreshes
    corpus_limit: int | None = None
    shards: int = 1
    shard_cpus: float = 1.0       # CPUs each shard actor reserves
    refresh_encoders: int = 0     # 0: re-encode inside the refresher actor at low priority
                                  # (no start-up cost); N: a pool of N Ray encoder actors (1 CPU each)

    def __post_init__(self) -> None:
        if self.shard_cpus < 0:
            raise ValueError(f"config key 'index.shard_cpus' must be >= 0, got {self.shard_cpus}")
        if self.refresh_encoders < 0:
            raise ValueError(f"config key 'index.refresh_encoders' must be >= 0, got {self.refresh_encoders}")
        if self.shards < 1:
            raise ValueError(f"config key 'index.shards' must be >= 1, got {self.shards}")
        if self.corpus_limit is not None and self.corpus_limit < 1:
            raise ValueError(f"config key 'index.corpus_limit' must be >= 1, got {self.corpus_limit}")


@dataclass(frozen=True)
class ModelsConfig:
    query_encoder: str = "default"
    doc_encoder: str = "default"
    generator: str = "default"


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0        # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"config key 'optimizer.lr' must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"config key 'optimizer.weight_decay' must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"config key 'optimizer.grad_clip' must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class ScheduleConfig:
    steps: int
    batch_size: int               # global batch: split across the workers of a step
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key 'schedule.{key}' must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int | list[int] = 1   # fixed, or [min, max] for elastic training
    use_gpu: bool = False
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        low, high = self.worker_range
        if low < 1 or high < low:
            raise ValueError(f"config key 'scaling.num_workers' must be n >= 1 or [min, max] "
                             f"with 1 <= min <= max, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"config key 'scaling.cpus_per_worker' must be > 0, got {self.cpus_per_worker}")

    @property
    def worker_range(self) -> tuple[int, int]:
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        if len(self.num_workers) != 2:
            raise ValueError(f"config key 'scaling.num_workers' must be an int or [min, max], "
                             f"got {self.num_workers}")
        return self.num_workers[0], self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)


@dataclass(frozen=True)
class TrainConfig:
    name: str
    storage_path: str
    data: DataConfig
    index: IndexConfig
    schedule: ScheduleConfig
    models: ModelsConfig = field(default_factory=ModelsConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    n_docs: int = 5
    variant: str = "sequence"
    refresh: str = ""             # "0-1000:100,1000-:500"; empty: never
    train_doc_encoder: bool = False
    max_failures: int = 0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"config key 'name' must be letters, digits, '_.-', got {self.name!r}")
        if self.n_docs < 1:
            raise ValueError(f"config key 'n_docs' must be >= 1, got {self.n_docs}")
        if self.variant not in VARIANTS:
            raise ValueError(f"config key 'variant' must be one of {VARIANTS}, got {self.variant!r}")
        if self.max_failures < -1:
            raise ValueError(f"config key 'max_failures' must be >= -1, got {self.max_failures}")
        if self.schedule.batch_size < self.scaling.worker_range[1]:
            raise ValueError(f"config key 'schedule.batch_size' ({self.schedule.batch_size}) must be "
                             f">= the most workers ({self.scaling.worker_range[1]})")
        RefreshSchedule.parse(self.refresh)


class RefreshSchedule:
    """Steps → refresh interval, from "START-END:EVERY,..." (END empty: open-ended).

    "0-1000:100,1000-:500" refreshes at steps 100, 200, ..., 1000, 1500, 2000, ...: a step s
    refreshes when it lies in a range [START, END) and (s - START) is a positive multiple of
    EVERY. Ranges must be ordered and must not overlap. The empty string never refreshes.
    """

    def __init__(self, ranges: list[tuple[int, int | None, int]]) -> None:
        self.ranges = ranges

    @classmethod
    def parse(cls, spec: str) -> "RefreshSchedule":
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


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one YAML value against a field's type hint; ValueError names the key."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(hint, value, key + ".")
    args = typing.get_args(hint)
    if type(None) in args and value is None:
        return None
    candidates = [a for a in args if a is not type(None)] or [hint]
    for kind in candidates:
        origin = typing.get_origin(kind) or kind
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if origin is str and isinstance(value, str):
            return value
        if origin is list and isinstance(value, list):
            return [_coerce(v, typing.get_args(kind)[0], key) for v in value]
    raise ValueError(f"config key '{key}' has a bad value {value!r} (expected {hint})")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key '{prefix}{unknown[0]}'")
    values = {}
    for name, spec in fields.items():
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], prefix + name)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ValueError(f"missing config key '{prefix}{name}'")
    return cls(**values)


def config_from_dict(raw: dict) -> TrainConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"a training config must be a mapping, got {type(raw).__name__}")
    return _build(TrainConfig, raw)


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training config; relative data paths resolve from its folder."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such config file {str(path)!r}")
    raw = yaml.safe_load(path.read_text())
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        for key in ("train", "eval"):
            if isinstance(raw["data"].get(key), str) and raw["data"][key] != BUILTIN_QA:
                raw["data"][key] = str((path.parent / raw["data"][key]).resolve())
    return config_from_dict(raw)
