"""The experiment presets shipped as package data: `rayrag experiment --preset NAME` reads NAME.yaml."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
NAMES = tuple(sorted(path.stem for path in FOLDER.glob("*.yaml")))  # cpu, cpu_retrievers, gpu


def preset_path(name: str) -> Path:
    """The YAML file of preset `name`; ValueError naming it and the presets there are otherwise."""
    if name not in NAMES:
        raise ValueError(f"unknown preset {name!r}: expected one of {list(NAMES)}")
    return FOLDER / f"{name}.yaml"
