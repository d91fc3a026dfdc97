"""Stage fingerprints: a finished stage is reused only when its config, code version and inputs are unchanged.

A stage file `stages/NAME.json` holds {"fingerprint": {config, code, inputs}, "run": id, "result": ...}.
The code version is `git describe --always --dirty` in a checkout, else the package version.
A stage's inputs are the digests of the stage files it read; each run of a stage gets a new run id, so
re-running (forcing) a stage changes what its dependents see and they refuse until forced too.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import subprocess
import uuid
from collections.abc import Collection, Mapping
from functools import cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@cache
def code_version() -> str:
    """`git describe --always --dirty` of the checkout rayrag runs from, else "rayrag VERSION"."""
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            described = subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            return described.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"rayrag {importlib.metadata.version('rayrag')}"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': leaf} for nested mappings; lists and scalars are leaves."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def config_changes(old: Any, new: Any) -> list[str]:
    """'key: old → new' for every leaf that differs (compared as JSON)."""
    before, after = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
    return [
        f"{key or 'config'}: {before.get(key)!r} → {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


def fingerprint_changes(old: Mapping, new: Mapping) -> list[str]:
    """What differs between two fingerprints, in words."""
    changes = [f"config {change}" for change in config_changes(old.get("config"), new.get("config"))]
    if old.get("code") != new.get("code"):
        changes.append(f"code version {old.get('code')!r} → {new.get('code')!r}")
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    changes += [
        f"input {name!r} changed"
        for name in sorted(set(old_inputs) | set(new_inputs))
        if old_inputs.get(name) != new_inputs.get(name)
    ]
    return changes


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class StageStore:
    """The stage files of one output folder; `force` names the stages to redo."""

    def __init__(self, folder: Path, force: Collection[str] = (), code: str | None = None) -> None:
        self.folder, self.force, self.code = folder, set(force), code or code_version()
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def fingerprint(self, config: Any, inputs: Collection[str]) -> dict:
        """This run's fingerprint of a stage: its config section, the code, the input stages' digests."""
        return {"config": config, "code": self.code, "inputs": {name: self.digest(name) for name in inputs}}

    def digest(self, name: str) -> str:
        """The digest of a finished stage's file (what its dependents record as their input)."""
        path = self.path(name)
        if not path.is_file():
            raise ValueError(f"stage {name!r} has not run: no {str(path)!r}")
        return digest(json.loads(path.read_text()))

    def reuse(self, name: str, fingerprint: dict) -> dict | None:
        """The stored result when the stage ran with this fingerprint; None when it must run (no file,
        or forced). A stage file with another fingerprint is a ValueError naming what changed."""
        path = self.path(name)
        if name in self.force or not path.is_file():
            return None
        stored = json.loads(path.read_text())
        if "fingerprint" not in stored:
            changes = ["the stage file has no fingerprint (an older rayrag wrote it)"]
        else:
            changes = fingerprint_changes(stored["fingerprint"], fingerprint)
        if changes:
            raise ValueError(
                f"stage {name!r} in {str(path)!r} ran with another setup: {'; '.join(changes)}. "
                f"Redo it with --force-stage {name}, or use another --out"
            )
        return stored["result"]

    def save(self, name: str, fingerprint: dict, result: dict) -> None:
        """Write the stage file; its run id makes every run's digest new, even with an equal result."""
        record = {"fingerprint": fingerprint, "run": uuid.uuid4().hex, "result": result}
        self.path(name).write_text(json.dumps(record, indent=1))
