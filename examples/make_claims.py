"""Write training/shipped/claims.jsonl (data spec "claims"): the label-generation (`classify`) test set.

200 claims from the SQuAD v1.1 dev articles of the test split (`training.data.article_split`), made by
`make_claims` below with seed 0: 100 "true" claims state a question's answer, 100 "false" ones an
answer of another question of the same article and rough type. Deterministic: rerunning it rewrites the
same file (tests/training/test_tasks.py checks that).

    .venv/bin/python examples/make_claims.py [--count 200] [--split test] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

from cluster.passages import squad_dev_path
from training.data import SHIPPED_CLAIMS, QAExample, Split, squad_qa_by_article
from training.scoring import normalize_answer

CLAIM_LABELS = ("true", "false")  # the label words of `make_claims`


def _kind(answer: str) -> str:
    """A rough answer type, for swapping like with like: a number, a name, or other."""
    if any(ch.isdigit() for ch in answer):
        return "number"
    return "name" if answer[:1].isupper() else "other"


def _swaps(example: QAExample, article: Sequence[QAExample]) -> list[str]:
    """Answers of other questions of the article, of the same kind, that neither contain nor are
    contained in any of this question's gold answers (after SQuAD normalisation)."""
    gold = [normalize_answer(a) for a in example.answers]
    out = {}
    for other in article:
        answer = other.answers[0]
        norm = normalize_answer(answer)
        if (
            norm
            and _kind(answer) == _kind(example.answers[0])
            and not any(norm in g or g in norm for g in gold)
        ):
            out.setdefault(norm, answer)
    return sorted(out.values())


def claim_text(question: str, answer: str) -> str:
    return f'The answer to "{question.strip()}" is {answer}.'


def make_claims(path: Path, split: Split | None, count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` labelled claims from SQuAD-format data, half "true" and half "false", drawn with `seed`.

    Questions are shuffled; claim i takes label CLAIM_LABELS[i % 2]. A true claim states a question's
    first answer (`claim_text`); a false one a different answer drawn from the other questions of the
    same article with the same rough type (number, capitalised name, other), never one that contains or
    is contained in a gold answer; a question with no such answer is passed over for a false claim.
    """
    rng = random.Random(seed)
    pool = [(e, article) for _, article in squad_qa_by_article(path, split) for e in article]
    rng.shuffle(pool)
    claims: list[dict[str, str]] = []
    for example, article in pool:
        label = CLAIM_LABELS[len(claims) % 2]
        swaps = _swaps(example, article) if label == "false" else []
        if label == "false" and not swaps:
            continue
        answer = rng.choice(swaps) if swaps else example.answers[0]
        claims.append({"claim": claim_text(example.input, answer), "label": label})
        if len(claims) == count:
            return claims
    raise ValueError(f"{str(path)!r} (split {split}) has too few questions for {count} claims")


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
