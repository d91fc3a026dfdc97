"""Checkpoints: weights + optimiser + step + index version round-trip; incompatible models refused."""

from __future__ import annotations

import json

import pytest
import torch

from services.rag.checkpoint import TrainState, read_state
from training.checkpoint import load_checkpoint, save_checkpoint


def make(width: int = 4, seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    embed = torch.nn.Embedding(10, width)
    head = torch.nn.Linear(width, 10)
    head.weight = embed.weight  # tied, like many generators
    return {"rag": torch.nn.Sequential(embed, head)}


def test_round_trip_restores_weights_optimiser_and_state(tmp_path):
    modules = make()
    optimizer = torch.optim.AdamW(modules["rag"].parameters(), lr=0.1)
    modules["rag"](torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    state = TrainState(step=7, index_version="v0003", models={"generator": "tiny"})
    save_checkpoint(tmp_path, modules, optimizer, state)

    fresh = make(seed=1)
    fresh_optimizer = torch.optim.AdamW(fresh["rag"].parameters(), lr=0.1)
    assert load_checkpoint(tmp_path, fresh, fresh_optimizer) == state == read_state(tmp_path)
    for a, b in zip(modules["rag"].state_dict().values(), fresh["rag"].state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1


def test_incompatible_checkpoint_is_refused(tmp_path):
    save_checkpoint(tmp_path, make(width=4), None, TrainState(1, "v0001", {}))
    with pytest.raises(ValueError, match=r"incompatible checkpoint: parameter 'rag.0.weight' has shape"):
        load_checkpoint(tmp_path, make(width=8))
    with pytest.raises(ValueError, match="incompatible checkpoint: it lacks parameter 'other.bias'"):
        load_checkpoint(tmp_path, make() | {"other": torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="is not a rayrag checkpoint"):
        read_state(tmp_path / "nowhere")


def test_export_gives_folders_that_load_as_the_trained_models(tmp_path, capsys):
    """`rayrag export`: the trained weights come back through the plain loaders serving uses."""
    from argparse import Namespace

    from cluster.encoders import TextEncoder
    from services.rag.loading import load_generator
    from tests.tiny_models import save_tiny_encoder, save_tiny_generator
    from training.cli import run_export
    from training.config import ModelsConfig
    from training.modules import build_train_module, export_models

    encoder = save_tiny_encoder(tmp_path / "encoder")
    models = ModelsConfig(
        query_encoder=encoder, doc_encoder=encoder, generator=save_tiny_generator(tmp_path / "generator")
    )
    module = build_train_module(models, "sequence", train_doc_encoder=True)
    with torch.no_grad():  # stand-in for training: every weight moves away from the start
        for parameter in module.parameters():
            parameter.add_(0.01)
    state = TrainState(step=3, index_version="v0002", models=vars(models), doc_encoder_trained=True)
    save_checkpoint(tmp_path / "ckpt", module.modules_to_save(), None, state)

    folders = export_models(tmp_path / "ckpt", tmp_path / "export")
    query = TextEncoder.from_pretrained(folders["query_encoder"])
    assert (query.pooling, query.normalize) == (
        module.rag.query_encoder.pooling,
        module.rag.query_encoder.normalize,
    )
    texts = ["apple?", "a longer question about a river"]
    assert (query.encode(texts) == module.rag.query_encoder.encode(texts)).all()
    doc = TextEncoder.from_pretrained(folders["doc_encoder"])
    assert (doc.encode(texts) == module.doc_encoder.encode(texts)).all()
    assert not (doc.encode(texts) == TextEncoder.from_pretrained(encoder).encode(texts)).all()
    generator, _ = load_generator(folders["generator"])
    trained = module.rag.generator.model.state_dict()
    for key, value in generator.state_dict().items():
        assert torch.equal(value, trained[key]), key

    assert run_export(Namespace(checkpoint=str(tmp_path / "ckpt"), out=str(tmp_path / "again"))) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["index_version"] == "v0002"  # a trained doc encoder: serve the version it made
    assert printed["serve"].endswith("--index-version v0002")


def test_load_rag_reads_a_checkpoint_at_the_precision_asked(tmp_path):
    """Inference's one loader: a checkpoint's trained weights over the named models, the generator's
    stored in the precision asked (the float32 weights rounded), the query encoder's as trained."""
    from services.rag.loading import load_rag
    from tests.tiny_models import save_tiny_encoder, save_tiny_generator
    from training.config import ModelsConfig
    from training.modules import build_train_module

    encoder = save_tiny_encoder(tmp_path / "encoder")
    models = ModelsConfig(
        query_encoder=encoder, doc_encoder=encoder, generator=save_tiny_generator(tmp_path / "generator")
    )
    module = build_train_module(models, "sequence", train_doc_encoder=True)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.01)
    state = TrainState(step=1, index_version="v0001", models=vars(models), doc_encoder_trained=True)
    save_checkpoint(tmp_path / "ckpt", module.modules_to_save(), None, state)

    trained = module.rag.state_dict()
    for precision, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        rag = load_rag(models, precision, tmp_path / "ckpt")
        assert not rag.training
        assert {p.dtype for p in rag.generator.parameters()} == {dtype}
        for key, value in rag.state_dict().items():
            expected = trained[key].to(dtype) if key.startswith("generator.") else trained[key]
            assert torch.equal(value, expected), key
    shipped = load_rag(models, "float32")
    assert not torch.equal(
        shipped.state_dict()["generator.model.lm_head.weight"], trained["generator.model.lm_head.weight"]
    )
