"""Every bench script imports: a module moved or renamed elsewhere must not break a benchmark unseen."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py")))
def test_bench_script_imports(script: str) -> None:
    importlib.import_module(f"bench.{script}")
