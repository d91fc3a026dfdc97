"""Decoding KV caches on transformers' cache classes: over given keys/values, over rows, a beam layer."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def cache_over(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding these (keys, values) per layer as they are (its constructor copies them)."""
    cache = DynamicCache([(keys[..., :0, :], values[..., :0, :]) for keys, values in kv])
    for layer, (keys, values) in zip(cache.layers, kv, strict=True):
        layer.keys, layer.values = keys, values
    return cache


def rows_of(kv: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor) -> DynamicCache:
    """A cache over rows `rows` of per-context (keys, values); index_select copies faster than indexing."""
    return cache_over([(keys.index_select(0, rows), values.index_select(0, rows)) for keys, values in kv])


class BeamLayer(DynamicLayer):
    """One layer's keys and values while beams decode a prompt: kept in a buffer with room to grow,
    so a step writes its token in place instead of copying the cache, and a beam reorder moves only
    the generated positions (the beams of one prompt share its keys, so those never move)."""

    ROOM = 32  # positions added whenever the buffer is full

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.prompt = keys.shape[2]
        self.key_buffer, self.value_buffer = self._with_room(keys, 0), self._with_room(values, 0)
        self._show(self.prompt)

    def _with_room(self, states: torch.Tensor, more: int) -> torch.Tensor:
        """A (R, h, n + room, d) buffer starting with `states` (R, h, n, d)."""
        r, h, n, d = states.shape
        buffer = states.new_empty(r, h, n + max(self.ROOM, more), d)
        buffer[:, :, :n] = states
        return buffer

    def _show(self, length: int) -> None:
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.keys.shape[2], self.keys.shape[2] + key_states.shape[2]
        if end > self.key_buffer.shape[2]:
            more = key_states.shape[2]
            self.key_buffer, self.value_buffer = (
                self._with_room(self.keys, more),
                self._with_room(self.values, more),
            )
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self._show(end)
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        generated = slice(self.prompt, self.keys.shape[2])
        for buffer in (self.key_buffer, self.value_buffer):
            buffer[:, :, generated] = buffer[:, :, generated].index_select(0, beam_idx)
