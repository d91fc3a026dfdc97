"""The precision setting and the beam-decoding cache that writes in place."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from services.rag import precision
from services.rag.kv_cache import BeamLayer


def test_auto_follows_the_hardware_and_a_forced_precision_does_not(monkeypatch):
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "native_bfloat16", lambda native=native: native)
        assert precision.resolve_dtype("auto") == dtype
        assert precision.resolve_dtype("float32") == torch.float32
        assert precision.resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be .* got 'fp8'"):
        precision.resolve_dtype("fp8")


def test_beam_layer_holds_what_a_growing_cache_holds_through_steps_and_reorders():
    """Against transformers' DynamicLayer: the same appends and beam reorders (within a prompt's
    rows), past the buffer's first room, give the same keys and values."""
    gen = torch.Generator().manual_seed(0)
    prompt_k, prompt_v = (torch.randn(2, 1, 5, 4, generator=gen) for _ in range(2))  # 2 prompts
    rows = torch.tensor([0, 0, 0, 1, 1, 1])  # 3 beams each
    ours, reference = BeamLayer(prompt_k[rows], prompt_v[rows]), DynamicLayer()
    reference.update(prompt_k[rows], prompt_v[rows])
    for _ in range(BeamLayer.ROOM + 3):
        k, v = (torch.randn(6, 1, 1, 4, generator=gen) for _kv in range(2))
        got, want = ours.update(k, v), reference.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        within = (
            torch.randint(0, 3, (6,), generator=gen) + rows * 3
        )  # each beam continues one of its prompt's
        ours.reorder_cache(within)
        reference.reorder_cache(within)
        assert torch.equal(ours.keys, reference.keys) and torch.equal(ours.values, reference.values)
    assert ours.get_seq_length() == 5 + BeamLayer.ROOM + 3
