"""`rayrag index build` into an object-store root (a moto S3 server on 127.0.0.1): the streaming build's
work directory and the version both live on S3, `rayrag index list` shows it, a shard group serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DIM, N = 32, 3000
ENCODER = f"synthetic:dim={DIM},clusters=16,spread=0.5,seed=0"

# Runs in a fresh interpreter so that its local Ray's workers inherit the AWS variables naming moto.
SCRIPT = """
import json, sys
import faiss, numpy as np, ray
from cluster.shard_group import ShardGroup, ShardGroupConfig
from cluster.synthetic import MixtureEncoder
from rayrag_cli import main

corpus, root, encoder, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
code = main(["index", "build", "--corpus", corpus, "--index-root", root, "--encoder", encoder,
             "--shards", "2", "--encoders", "1", "--max-worker-memory", "1GiB"])
mixture = MixtureEncoder.parse(encoder)
queries = mixture.queries(20, seed=3)
flat = faiss.IndexFlatIP(queries.shape[1])
flat.add(mixture.vectors(0, n))
group = ShardGroup(ShardGroupConfig(index_root=root, shard_cpus=0.05))
try:
    result = group.search(queries, 10)
    equal = bool(np.array_equal(result.ids, flat.search(queries, 10)[1]))
    print(json.dumps({"code": code, "version": group.version, "ids_equal": equal}))
finally:
    group.close()
    ray.shutdown()
"""


def test_cli_builds_into_an_s3_root_lists_it_and_a_group_serves_it(s3_root: str, tmp_path: Path, capsys):
    from cluster import storage
    from rayrag_cli import main

    corpus = tmp_path / "corpus.jsonl"
    rows = [{"id": i, "title": f"t{i}", "text": f"passage {i} about river {i % 7}"} for i in range(N)]
    corpus.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    root = f"{s3_root}/streamed"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(corpus), root, ENCODER, str(N)],
        capture_output=True,
        text=True,
        env=env,
        timeout=480,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"code": 0, "version": "v0001", "ids_equal": True}, done.stdout
    assert f"serve it with: rayrag serve --index-root {root} " in done.stdout
    assert storage.list_names(root) == ["PUBLISHED", "v0001"]  # the work directory is gone
    capsys.readouterr()
    assert main(["index", "list", "--index-root", root]) == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert listed["version"] == "v0001" and listed["published"] and listed["count"] == N
    assert listed["shards"] == 2
