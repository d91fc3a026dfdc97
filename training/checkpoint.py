"""Writing and resuming training checkpoints (weights, optimiser state); inference reads them in services."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.rag.checkpoint import STATE, WEIGHTS, TrainState, load_weights

OPTIMIZER = "optimizer.pt"


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


def load_checkpoint(
    directory: str | Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None = None
) -> TrainState:
    """Restore weights (and optimiser state when given) in place; return the train state.

    A checkpoint from another model (a parameter missing, extra or reshaped) is a ValueError."""
    state = load_weights(directory, modules)
    if optimizer is not None:
        load_optimizer_state(directory, optimizer)
    return state


def load_optimizer_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore optimiser state saved beside the weights (after the model is on its device)."""
    path = Path(directory) / OPTIMIZER
    if path.is_file():
        optimizer.load_state_dict(torch.load(path, weights_only=True))
