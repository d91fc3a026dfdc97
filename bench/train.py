"""Training benchmark: the Ray Train loop against a plain single-process loop (same model, batch and
retrieval), and training throughput while an index refresh re-encodes the corpus against without.

Both loops run `training.loop.train_step` on the same global batches; the Ray Train side is one
worker (the plain loop is one process) with the same torch thread count; the plain loop runs
before and after the Ray Train run and the ratio uses the median over both. Step time = wall time
between consecutive finished steps (retrieval, loss, backward, update, bookkeeping), median over
the steps after warm-up. Throughput during refresh = steps/s while a re-encode is in flight over
steps/s outside refresh windows, in one run with the document encoder trained.
The last line printed is one JSON object.

    python bench/train.py --steps 30 --batch-size 8 --n-docs 4 --passages 3000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.tiny_models


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-docs", type=int, default=4)
    parser.add_argument("--passages", type=int, default=3000)
    parser.add_argument("--refresh-steps", type=int, default=60, help="length of the refresh run")
    parser.add_argument("--refresh-every", type=int, default=20)
    parser.add_argument("--encoder", default="tiny", help="'tiny' (seeded BERT) or a name/path")
    parser.add_argument("--generator", default="tiny", help="'tiny' (seeded BART) or a name/path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (= CPUs per Ray worker)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    return parser.parse_args()


def make_data(root: Path, passages: int, seed: int = 0) -> tuple[str, str]:
    """A synthetic corpus (JSONL) of 60-word passages and questions drawn from them."""
    from transformers import AutoTokenizer

    from cluster.encoders import default_encoder_path

    vocab = [
        w for w in AutoTokenizer.from_pretrained(default_encoder_path()).vocab if w.isalpha() and len(w) > 3
    ]
    rng = np.random.default_rng(seed)
    docs, qa = [], []
    for i in range(passages):
        words = rng.choice(vocab, 60).tolist()
        docs.append({"id": i, "title": f"doc {i}", "text": " ".join(words)})
        if i % max(1, passages // 256) == 0:
            qa.append({"question": " ".join(words[:6]) + "?", "answers": [words[10]]})
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa))
    return str(root / "corpus.jsonl"), str(root / "qa.jsonl")


def make_models(root: Path, encoder: str, generator: str) -> tuple[str, str]:
    from tests.tiny_models import save_tiny_encoder, save_tiny_generator

    if encoder == "tiny":
        encoder = save_tiny_encoder(root / "encoder", dim=128, layers=2)
    if generator == "tiny":
        generator = save_tiny_generator(root / "generator", kind="seq2seq", dim=128, layers=2)
    return encoder, generator


def step_times(history: Path, warmup: int) -> list[tuple[int, float, str]]:
    """(step, seconds since the previous step finished, index version) after warm-up."""
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return [
        (b["step"], b["time"] - a["time"], b["index_version"])
        for a, b in zip(rows, rows[1:])
        if b["step"] > warmup
    ]


def plain_loop(cfg, steps: int, warmup: int) -> list[float]:
    """The same train_step in this process: no Ray Train, the shard group called directly."""
    from cluster.shard_group import ShardGroup
    from services.rag.retrieval import group_search
    from training.data import load_qa
    from training.loop import global_batch, make_optimizer, train_step
    from training.modules import build_train_module

    module = build_train_module(cfg.models, cfg.mode, cfg.train_doc_encoder).train()
    optimizer = make_optimizer(module, cfg.optimizer)
    examples = load_qa(cfg.data.train)
    group = ShardGroup(cfg.index)
    search = group_search(group)
    times, last = [], time.monotonic()
    try:
        for step in range(steps):
            batch = global_batch(len(examples), step, cfg.schedule.batch_size, cfg.schedule.seed)
            train_step(module, optimizer, search, [examples[i] for i in batch], cfg)
            now = time.monotonic()
            if step >= warmup:
                times.append(now - last)
            last = now
    finally:
        group.close()
    return times


def refresh_windows(
    times: list[tuple[int, float, str]], refreshes: list[dict]
) -> tuple[list[float], list[float]]:
    """Split step times into those while a refresh was in flight and the rest."""
    busy_steps = set()
    for refresh in refreshes:
        landed = next((s for s, _, v in times if v == refresh["version"]), None)
        end = landed if landed is not None else max(s for s, _, _ in times) + 1
        busy_steps |= set(range(refresh["step"] + 1, end + 1))
    during = [t for s, t, _ in times if s in busy_steps]
    outside = [t for s, t, _ in times if s not in busy_steps]
    return during, outside


def main() -> None:
    args = parse_args()
    from training.config import config_from_dict
    from training.trainer import prepare_index, run_training

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="rayrag-bench-train-"))
    corpus, qa = make_data(root, args.passages)
    encoder, generator = make_models(root, args.encoder, args.generator)
    ray.init(
        num_cpus=args.num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )

    def config(name: str, steps: int, **extra):
        raw = {
            "name": name,
            "storage_path": str(root / "runs"),
            "data": {"train": qa},
            "index": {"root": str(root / f"index-{name}"), "corpus": corpus, "shard_cpus": 0},
            "models": {"query_encoder": encoder, "doc_encoder": encoder, "generator": generator},
            "n_docs": args.n_docs,
            "optimizer": {"lr": 1e-4},
            "schedule": {"steps": steps, "batch_size": args.batch_size, "checkpoint_every": steps},
            "scaling": {"num_workers": 1, "cpus_per_worker": args.threads},
        } | extra
        return config_from_dict(raw)

    fixed = config("fixed", args.steps)
    prepare_index(fixed)
    # plain, Ray Train, plain again: load from other processes drifts, the two plain runs bracket it
    plain_before = plain_loop(fixed, args.steps, args.warmup)
    ray_train = [t for _, t, _ in step_times(run_training(fixed).history, args.warmup)]
    plain_after = plain_loop(fixed, args.steps, args.warmup)
    plain = plain_before + plain_after

    refreshing = config(
        "refresh", args.refresh_steps, train_doc_encoder=True, refresh=f"0-:{args.refresh_every}"
    )
    outcome = run_training(refreshing)
    during, outside = refresh_windows(step_times(outcome.history, args.warmup), outcome.refresh["refreshes"])
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)

    result = {
        "plain_step_s": statistics.median(plain),
        "plain_step_s_before_after": [statistics.median(plain_before), statistics.median(plain_after)],
        "ray_train_step_s": statistics.median(ray_train),
        "step_time_ratio": statistics.median(ray_train) / statistics.median(plain),
        "steps_per_s_outside_refresh": 1 / statistics.mean(outside) if outside else None,
        "steps_per_s_during_refresh": 1 / statistics.mean(during) if during else None,
        "throughput_during_refresh": statistics.mean(outside) / statistics.mean(during)
        if during and outside
        else None,
        "refreshes": outcome.refresh["refreshes"],
        "steps_during_refresh": len(during),
        "batch_size": args.batch_size,
        "n_docs": args.n_docs,
        "passages": args.passages,
        "encoder": args.encoder,
        "generator": args.generator,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
