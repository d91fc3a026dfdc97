"""A toy RAG task shared by the training tests: tiny encoder + generator, a 32-passage corpus whose
answers exist nowhere else, train/held-out questions, and a config builder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

KEYS = (
    "apple river castle violin tiger planet harbor candle mirror forest rocket garden bridge desert "
    "island engine falcon glacier lantern meadow orchard palace quartz saddle temple valley wagon "
    "canyon dolphin eagle feather hammer"
).split()
ANSWERS = (
    "red blue green black white gold silver pink brown gray orange purple north south east west "
    "one two three four five six seven eight nine ten zero hot cold warm dry wet"
).split()
TRAIN = 24  # the first 24 keys are trained on; the rest are held out


@dataclass(frozen=True)
class Toy:
    root: Path
    encoder: str
    generator: str
    corpus: str
    train: str
    heldout: str
    answers: dict[str, str]
    seed: int = 0  # of the toy's data, the generator's initialisation and the training order

    def raw_config(self, run_dir: Path, **overrides) -> dict:
        """A training config dict (YAML-shaped) for this toy; sections merge with `overrides`."""
        raw = {
            "name": "toy",
            "storage_path": str(run_dir / "runs"),
            "data": {"train": self.train},
            "index": {"root": str(run_dir / "index"), "corpus": self.corpus, "shard_cpus": 0},
            "models": {
                "query_encoder": self.encoder,
                "doc_encoder": self.encoder,
                "generator": self.generator,
            },
            "n_docs": 3,
            "mode": "sequence",
            "optimizer": {"lr": 1e-2, "grad_clip": 1.0},
            "schedule": {"steps": 6, "batch_size": 4, "checkpoint_every": 3},
            "scaling": {"num_workers": 2},
            "compute": {"precision": "float32"},  # the same arithmetic on every CPU
        }
        for key, value in overrides.items():
            raw[key] = (
                raw[key] | value if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
            )
        return raw


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Toy:
    from tests.tiny_models import save_tiny_encoder, save_tiny_generator

    root = tmp_path_factory.mktemp("toy")
    answers = dict(zip(KEYS, np.random.default_rng(0).permutation(ANSWERS).tolist()))
    corpus = _write_jsonl(
        root / "corpus.jsonl", [{"id": i, "title": k, "text": answers[k]} for i, k in enumerate(KEYS)]
    )
    qa = [{"question": f"{k}?", "answers": [answers[k]]} for k in KEYS]
    return Toy(
        root=root,
        encoder=save_tiny_encoder(root / "encoder", dim=128, layers=0),
        generator=save_tiny_generator(root / "generator", kind="seq2seq", dim=64),
        corpus=corpus,
        train=_write_jsonl(root / "train.jsonl", qa[:TRAIN]),
        heldout=_write_jsonl(root / "heldout.jsonl", qa[TRAIN:]),
        answers=answers,
    )


@pytest.fixture(scope="session")
def toy_index(toy, ray_session) -> Path:
    """Version v0001 of the toy index, built once; tests that refresh copy it first."""
    from training.config import config_from_dict
    from training.trainer import prepare_index

    prepare_index(config_from_dict(toy.raw_config(toy.root)))
    return toy.root / "index"


# A second toy, for learning to copy from the passage: two-word keys whose answers (one of 16 words)
# exist only in their passage. There are too many training keys to memorise within the test's
# steps, so reading the answer out of the top passage is what lowers the loss; held-out keys then
# show whether the generator learned to read: no closed-book model can know their answers.
MORE_KEYS = (
    "paris market capital earth degree coast letter season border window summer doctor "
    "kitchen lesson pocket shadow ticket winter cotton basket button carpet circus dragon "
    "farmer jacket ladder monkey parrot pepper pillow rabbit"
).split()
POOL = 16
COPY_TRAIN, COPY_HELDOUT = 600, POOL
TOY_SEED = int(os.environ.get("RAYRAG_TOY_SEED", "0"))  # another seed: another toy, init and data order


@pytest.fixture(scope="session")
def copy_toy(tmp_path_factory) -> Toy:
    """600 training and 16 held-out keys ("apple river"); passage title = key, text = its answer. The
    held-out answers are the 16 pool words once each, so a constant guess scores 1/16. The encoder is
    wide (768) so that title-token overlap retrieves the key's passage; the generator's encoder has no
    layers, so each encoder output is its own token's and copying does not depend on the key's tokens."""
    from tests.tiny_models import save_tiny_encoder, save_tiny_generator

    root = tmp_path_factory.mktemp("copy_toy")
    rng = np.random.default_rng(TOY_SEED)
    words = KEYS + MORE_KEYS
    pairs = [f"{a} {b}" for a in words for b in words if a < b]  # no "b a" beside "a b": retrieval is exact
    keys = [pairs[i] for i in rng.choice(len(pairs), COPY_TRAIN + COPY_HELDOUT, replace=False)]
    pool = ANSWERS[:POOL]
    answers = {k: pool[i] for k, i in zip(keys[:COPY_TRAIN], rng.integers(0, POOL, COPY_TRAIN))}
    answers |= dict(zip(keys[COPY_TRAIN:], rng.permutation(pool).tolist()))
    corpus = _write_jsonl(
        root / "corpus.jsonl", [{"id": i, "title": k, "text": answers[k]} for i, k in enumerate(keys)]
    )
    qa = [{"question": f"{k}?", "answers": [answers[k]]} for k in keys]
    return Toy(
        root=root,
        encoder=save_tiny_encoder(root / "encoder", dim=768, layers=0),
        generator=save_tiny_generator(
            root / "generator", kind="seq2seq", dim=128, layers=1, encoder_layers=0, seed=TOY_SEED
        ),
        corpus=corpus,
        train=_write_jsonl(root / "train.jsonl", qa[:COPY_TRAIN]),
        heldout=_write_jsonl(root / "heldout.jsonl", qa[COPY_TRAIN:]),
        answers=answers,
        seed=TOY_SEED,
    )
