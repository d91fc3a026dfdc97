"""Grouped SDPA (one key/value row serves several query rows): registered with transformers on first use."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GROUPED_SDPA = "rayrag_grouped_sdpa"  # attention implementation name used while decoding seq2seq
_ATTENTION_SWITCH = threading.RLock()
_registered = False


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA where each key/value row serves a block of consecutive query rows.

    Cross-attention then reads one copy of a context's encoder keys for all its beams or scored
    targets; with equal row counts this is plain SDPA.
    """
    rows, groups = key.shape[0], query.shape[0] // key.shape[0]
    if groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _, heads, t, d = query.shape  # (C*G, h, T, d)
    query = (
        query.view(rows, groups, heads, t, d).transpose(1, 2).reshape(rows, heads, groups * t, d)
    )  # (C, h, G*T, d)
    if attention_mask is not None:  # rows of a block share their context's mask
        attention_mask = attention_mask[::groups, :, :1].expand(-1, -1, groups * t, -1)  # (C, 1, G*T, L)
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # (C, G*T, h, d)
    return out.reshape(rows * groups, t, heads, d), None  # (C*G, T, h, d)


def register_grouped_sdpa() -> None:
    """Make `grouped_sdpa` an attention implementation transformers knows by GROUPED_SDPA (idempotent)."""
    global _registered
    with _ATTENTION_SWITCH:
        if not _registered:
            AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
            AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
            _registered = True


@contextmanager
def grouped_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run `model` with `grouped_sdpa` attention, restoring its own implementation afterwards.

    The setting lives on the shared config, so the switch and the call run under one lock:
    another thread decoding with the same model (concurrent Serve batches) never sees it."""
    register_grouped_sdpa()
    with _ATTENTION_SWITCH:
        saved = model.config._attn_implementation
        model.config._attn_implementation = GROUPED_SDPA
        try:
            yield
        finally:
            model.config._attn_implementation = saved
