"""Which parameters learn, and at which rate: training's compute and optimiser options on tiny models."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from services.rag.loading import load_generator
from tests.tiny_models import save_tiny_generator
from training.config import ModelsConfig, OptimizerConfig, config_from_dict
from training.loop import freeze_retriever, make_optimizer
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


def test_bm25_doc_scores_fix_p_z_and_leave_the_query_encoder_without_gradient(toy):
    """With logits (40, 0) p(z|x) is one on the first passage: the marginal is its one-passage loss."""
    models = ModelsConfig(query_encoder=toy.encoder, doc_encoder=toy.encoder, generator=toy.generator)
    module = build_train_module(models, "sequence", train_doc_encoder=False)
    questions, answers = ["what is apple", "what is river"], ["red", "blue"]
    titles, texts = [["A", "B"], ["C", "D"]], [["apple is red", "tiger"], ["river is blue", "x"]]
    vectors = (
        np.random.default_rng(0).standard_normal((2, 2, module.rag.query_encoder.dim)).astype(np.float32)
    )
    fixed = np.array([[40.0, 0.0], [40.0, 0.0]], np.float32)  # (B, K)
    loss = module(questions, answers, titles, texts, vectors, fixed)
    loss.backward()
    assert all(p.grad is None for p in module.rag.query_encoder.parameters())
    first = [t[:1] for t in titles], [t[:1] for t in texts]
    alone = module(questions, answers, *first, vectors[:, :1])  # K = 1: p(z|x) = 1 whatever the score
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=1e-5)


def test_bm25_and_the_frozen_row_freeze_the_query_encoder_and_say_so_once(toy, tmp_path, caplog):
    models = ModelsConfig(query_encoder=toy.encoder, doc_encoder=toy.encoder, generator=toy.generator)
    module = build_train_module(models, "sequence", train_doc_encoder=False)
    for overrides, frozen in (
        ({"retrieval": {"retriever": "hybrid"}}, False),
        ({"retrieval": {"retriever": "bm25"}}, True),
        ({"train_query_encoder": False}, True),
    ):
        cfg = config_from_dict(toy.raw_config(tmp_path, **overrides))
        assert cfg.trains_query_encoder is not frozen
    caplog.set_level(logging.INFO, logger="training.loop")
    freeze_retriever(module, config_from_dict(toy.raw_config(tmp_path, retrieval={"retriever": "bm25"})), 0)
    assert not any(p.requires_grad for p in module.rag.query_encoder.parameters())
    assert [r.getMessage() for r in caplog.records].count(
        "[train toy] the query encoder is frozen (BM25's doc scores carry no gradient)"
    ) == 1
    with pytest.raises(ValueError, match="train_doc_encoder"):
        config_from_dict(toy.raw_config(tmp_path, train_doc_encoder=True, retrieval={"retriever": "bm25"}))
