"""A training checkpoint as inference reads it: its train state and its weights by component."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

WEIGHTS, STATE = "weights.safetensors", "state.json"


@dataclass(frozen=True)
class TrainState:
    step: int  # optimiser steps completed
    index_version: str  # the index version the weights were trained against
    models: dict[str, str]  # query_encoder / doc_encoder / generator → the name it started from
    doc_encoder_trained: bool = False  # the weights hold a document encoder too


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


def load_weights(directory: str | Path, modules: dict[str, torch.nn.Module]) -> TrainState:
    """Restore each named component's weights in place (each tensor cast to the parameter's dtype);
    return the train state. Components of the checkpoint not named in `modules` are not read.

    A checkpoint from another model (a parameter missing, extra or reshaped) is a ValueError."""
    state = read_state(directory)
    weights = {
        key: value
        for key, value in load_file(str(Path(directory) / WEIGHTS)).items()
        if key.split(".", 1)[0] in modules
    }
    check_compatible(weights, modules)
    for name, module in modules.items():
        module.load_state_dict(_component(weights, name))
    return state


def component_weights(directory: str | Path, name: str) -> dict[str, torch.Tensor]:
    """One component's tensors (e.g. "doc_encoder"), named as in its own `state_dict`."""
    return _component(load_file(str(Path(directory) / WEIGHTS)), name)


def _component(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors under `name.` in a checkpoint's flat weights, without that prefix."""
    prefix = name + "."
    return {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}
