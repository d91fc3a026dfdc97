"""Write training/shipped/claims.jsonl (data spec "claims"): the label-generation (`classify`) test set.

200 claims from the SQuAD v1.1 dev articles of the test split (`training.data.article_split`), made by
`training.tasks.make_claims` with seed 0: 100 "true" claims state a question's answer, 100 "false" ones an
answer of another question of the same article and rough type. Deterministic: rerunning it rewrites the
same file (tests/training/test_tasks.py checks that).

    .venv/bin/python examples/make_claims.py [--count 200] [--split test] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.passages import squad_dev_path
from training.data import SHIPPED_CLAIMS
from training.tasks import make_claims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=SHIPPED_CLAIMS)
    args = parser.parse_args()
    claims = make_claims(squad_dev_path(), args.split, args.count, args.seed)
    args.out.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in claims), encoding="utf-8")
    print(json.dumps({"out": str(args.out), "claims": len(claims)}))


if __name__ == "__main__":
    main()
