"""Mutation bench: mutmut over the pure core (RAG losses, decoding, top-k merge) against its own tests.

mutmut 3 copies the project into `mutants/` and reads `[tool.mutmut]` from pyproject.toml, so this
script runs it in a throw-away copy of the working tree (the files `git ls-files` lists, tracked or
untracked but not ignored) with that section appended there: nothing in the checkout is mutated or
left behind. It is a bench to run by hand, not a CI step: about 1,100 mutants, 6-25 minutes on two
shared cores (torch is pinned to one thread, which makes these tiny-model tests far faster).
The last line printed is one JSON object: counts, score = killed / total, per-module counts and
the surviving mutants' names.

    python bench/mutation.py                    # one mutmut worker
    python bench/mutation.py --keep             # keep the copy to inspect survivors (`mutmut show NAME`)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULES = ["services/rag/marginal.py", "services/rag/decoding.py", "cluster/merge.py"]
TESTS = [
    "tests/services/rag/test_rag_math.py",
    "tests/services/rag/test_decoding.py",
    "tests/cluster/test_merge.py",
]
# The packages mutmut copies into mutants/ (the mutated modules import their siblings from there).
PACKAGES = ["cluster", "services"]
STATUSES = [
    "killed",
    "survived",
    "timeout",
    "suspicious",
    "skipped",
    "no tests",
    "caught by type check",
    "segfault",
    "not checked",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-children", type=int, default=1, help="mutmut worker processes")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy and print its path")
    return p.parse_args()


def copy_worktree(dest: Path) -> None:
    """Copy the working tree's tracked and untracked-but-not-ignored files into `dest`."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the working tree is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def mutmut_section() -> str:
    """The `[tool.mutmut]` table for the copy's pyproject.toml."""
    return "\n".join(
        [
            "",
            "[tool.mutmut]",
            f"source_paths = {json.dumps(PACKAGES)}",
            f"only_mutate = {json.dumps(MODULES)}",
            f"pytest_add_cli_args_test_selection = {json.dumps(TESTS)}",
            "",
        ]
    )


def mutmut(workdir: Path, *args: str) -> str:
    """Run the mutmut CLI installed beside this interpreter in `workdir`; its stdout."""
    exe = Path(sys.executable).parent / "mutmut"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    done = subprocess.run([str(exe), *args], cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"mutmut {' '.join(args)} failed with exit code {done.returncode}")
    return done.stdout


def parse_results(text: str) -> dict[str, str]:
    """`mutmut results --all true` lines `    name: status` -> {name: status}."""
    out = {}
    for line in text.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and status in STATUSES:
            out[name] = status
    return out


def summarise(status_by_mutant: dict[str, str], seconds: float) -> dict:
    """Counts overall and per module, score = killed / total, and the survivors' names."""
    per_module: dict[str, Counter] = defaultdict(Counter)
    for name, status in status_by_mutant.items():
        per_module[name.rsplit(".", 1)[0]][status] += 1
    totals = sum(per_module.values(), Counter())
    total = sum(totals.values())
    summary = {status.replace(" ", "_"): totals[status] for status in STATUSES if totals[status]}
    return {
        "killed": totals["killed"],
        "survived": totals["survived"],
        "total": total,
        **summary,
        "score": round(totals["killed"] / total, 4) if total else 0.0,
        "modules": {
            m: {**dict(c), "total": sum(c.values()), "score": round(c["killed"] / sum(c.values()), 4)}
            for m, c in sorted(per_module.items())
        },
        "survivors": sorted(n for n, s in status_by_mutant.items() if s == "survived"),
        "other_not_killed": {
            n: s for n, s in sorted(status_by_mutant.items()) if s not in ("killed", "survived")
        },
        "seconds": round(seconds, 1),
    }


def main() -> None:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rayrag-mutation-"))
    try:
        workdir = tmp / "repo"
        copy_worktree(workdir)
        with open(workdir / "pyproject.toml", "a", encoding="utf-8") as f:
            f.write(mutmut_section())
        start = time.perf_counter()
        print(mutmut(workdir, "run", "--max-children", str(args.max_children))[-2000:], file=sys.stderr)
        seconds = time.perf_counter() - start
        status_by_mutant = parse_results(mutmut(workdir, "results", "--all", "true"))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summarise(status_by_mutant, seconds)))


if __name__ == "__main__":
    main()
