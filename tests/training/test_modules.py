"""Training's compute options on tiny generators: which parameters learn."""

from __future__ import annotations

import pytest

from services.rag.loading import load_generator
from tests.tiny_models import save_tiny_generator
from training.modules import train_top_layers


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
