"""Training checkpoints: safetensors weights, optimiser state, step and the index version trained against."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS, OPTIMIZER, STATE = "weights.safetensors", "optimizer.pt", "state.json"


@dataclass(frozen=True)
class TrainState:
    step: int  # optimiser steps completed
    index_version: str  # the index version the weights were trained against
    models: dict[str, str]  # query_encoder / doc_encoder / generator → the name it started from
    doc_encoder_trained: bool = False  # the weights hold a document encoder too


def _flat_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """One flat 'component.param' dict; tensors cloned so tied weights save separately."""
    return {
        f"{name}.{key}": value.detach().to("cpu").contiguous().clone()
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }


def save_checkpoint(
    directory: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    state: TrainState,
) -> Path:
    """Write weights, optimiser state and the train state into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_flat_state(modules), str(directory / WEIGHTS))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / OPTIMIZER)
    (directory / STATE).write_text(json.dumps(asdict(state), indent=1))
    return directory


def read_state(directory: str | Path) -> TrainState:
    path = Path(directory) / STATE
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} is not a rayrag checkpoint (no {STATE})")
    return TrainState(**json.loads(path.read_text()))


def check_compatible(weights: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module]) -> None:
    """ValueError naming the first parameter that is missing, extra or of another shape."""
    expected = {
        f"{name}.{key}": tuple(value.shape)
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }
    for key in sorted(set(expected) | set(weights)):
        if key not in weights:
            raise ValueError(f"incompatible checkpoint: it lacks parameter {key!r}")
        if key not in expected:
            raise ValueError(f"incompatible checkpoint: unexpected parameter {key!r}")
        if tuple(weights[key].shape) != expected[key]:
            raise ValueError(
                f"incompatible checkpoint: parameter {key!r} has shape "
                f"{tuple(weights[key].shape)}, the model has {expected[key]}"
            )


def load_checkpoint(
    directory: str | Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None = None
) -> TrainState:
    """Restore weights (and optimiser state when given) in place; return the train state.

    A checkpoint from another model (a parameter missing, extra or reshaped) is a ValueError."""
    state = read_state(directory)
    weights = load_file(str(Path(directory) / WEIGHTS))
    check_compatible(weights, modules)
    for name, module in modules.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    if optimizer is not None:
        load_optimizer_state(directory, optimizer)
    return state


def load_optimizer_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore optimiser state saved beside the weights (after the model is on its device)."""
    path = Path(directory) / OPTIMIZER
    if path.is_file():
        optimizer.load_state_dict(torch.load(path, weights_only=True))
