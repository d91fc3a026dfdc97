"""`rayrag eval --corpus`: the index is built once under --out with the checkpoint's document encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.encoders import TextEncoder
from cluster.index_store import list_versions, load_manifest, published_version
from rayrag_cli import main
from services.rag.checkpoint import TrainState, component_weights
from tests.tiny_models import save_tiny_encoder, save_tiny_generator
from training.checkpoint import save_checkpoint
from training.config import ModelsConfig
from training.modules import build_train_module

pytestmark = pytest.mark.slow


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_eval_builds_its_corpus_index_with_the_trained_doc_encoder_once(ray_session, tmp_path: Path) -> None:
    encoder = save_tiny_encoder(tmp_path / "encoder")
    models = ModelsConfig(
        query_encoder=encoder, doc_encoder=encoder, generator=save_tiny_generator(tmp_path / "generator")
    )
    module = build_train_module(models, "sequence", train_doc_encoder=True)
    with torch.no_grad():  # stand-in for training: the document encoder moves away from its start
        for parameter in module.doc_encoder.parameters():
            parameter.add_(0.01)
    state = TrainState(step=1, index_version="v0001", models=vars(models), doc_encoder_trained=True)
    checkpoint = str(save_checkpoint(tmp_path / "ckpt", module.modules_to_save(), None, state))
    corpus = _jsonl(
        tmp_path / "corpus.jsonl", [{"title": f"t{i}", "text": f"river castle {i}"} for i in range(4)]
    )
    data = _jsonl(tmp_path / "qa.jsonl", [{"question": "where is the river?", "answers": ["castle"]}])
    out = tmp_path / "eval"
    argv = ["eval", "--data", data, "--corpus", corpus, "--checkpoint", checkpoint, "--out", str(out)]
    argv += ["--n-docs", "2", "--settings", "rag_sequence", "--num-beams", "1", "--max-new-tokens", "2"]

    assert main(argv) == 0
    root = out / "index"
    version = published_version(root)
    trained = TextEncoder.from_pretrained(encoder)
    untrained = trained.fingerprint()
    trained.load_state_dict(component_weights(checkpoint, "doc_encoder"))
    assert load_manifest(root, version).encoder_fingerprint == trained.fingerprint() != untrained
    assert main(argv) == 0  # a re-run searches the index it built
    assert list_versions(root) == [version]
