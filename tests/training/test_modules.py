"""Which parameters learn, and at which rate: training's compute and optimiser options on tiny models."""

from __future__ import annotations

import pytest

from services.rag.loading import load_generator
from tests.tiny_models import save_tiny_generator
from training.config import ModelsConfig, OptimizerConfig
from training.loop import make_optimizer
from training.modules import build_train_module, train_top_layers


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_train_top_layers_leaves_only_the_top_blocks_and_final_norm_learning(kind, tmp_path):
    model, _ = load_generator(save_tiny_generator(tmp_path / kind, kind=kind, layers=3))
    train_top_layers(model, 2)
    blocks = model.get_decoder().layers
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for block in blocks[1:] for p in block.parameters())
    assert not model.get_input_embeddings().weight.requires_grad
    learning = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for block in blocks[1:] for p in block.parameters()}
    if kind == "causal":  # the final norm, and the output layer: the tiny Llama does not tie it
        expected |= {id(model.model.norm.weight), id(model.get_output_embeddings().weight)}
    assert learning == expected
    train_top_layers(model, 0)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="train_generator_layers=4 exceeds the generator's 3 blocks"):
        train_top_layers(model, 4)


def test_the_query_encoder_learns_at_its_own_rate(toy):
    models = ModelsConfig(query_encoder=toy.encoder, doc_encoder=toy.encoder, generator=toy.generator)
    module = build_train_module(models, "sequence", train_doc_encoder=False)
    for own, expected in ((1e-5, 1e-5), (None, 1e-3)):
        optimizer = make_optimizer(module, OptimizerConfig(lr=1e-3, query_encoder_lr=own))
        rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        assert len(rates) == sum(p.requires_grad for p in module.parameters())
        assert {rates[id(p)] for p in module.rag.query_encoder.parameters()} == {expected}
        assert {rates[id(p)] for p in module.rag.generator.parameters()} == {1e-3}
