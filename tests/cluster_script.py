"""Run a multi-node test script (its own Ray cluster) in a fresh process and read its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cluster_script(
    directory: Path, source: str, *args: str, timeout: float, env: Mapping[str, str] | None = None
) -> dict:
    """Write `source` under `directory`, run it with `args` from the repository root, and return the
    JSON object on its last stdout line; fails the test with its stderr when it exits non-zero."""
    script = directory / "cluster_script.py"
    script.write_text(source)
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
