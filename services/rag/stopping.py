"""Stopping a decoding between steps: the check a caller passes, and what is raised when it says stop.
Import-light on purpose: the Serve app's processes use these without loading the models' libraries."""

from __future__ import annotations

from collections.abc import Callable

StopCheck = Callable[[], bool]
"""Asked between decoding steps; True stops the decoding (its caller left, or its deadline passed)."""


class GenerationStopped(Exception):
    """Decoding was stopped between two steps because `StopCheck` said so."""


def check_stop(stop: StopCheck | None, where: str) -> None:
    """Raise GenerationStopped when `stop` says so; `where` names the point reached."""
    if stop is not None and stop():
        raise GenerationStopped(f"generation stopped {where}")
