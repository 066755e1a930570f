"""A KV cache for many rows that decode at different times.

transformers' `DynamicCache` concatenates each new position onto the whole cache (a copy of every
row's keys and values per step) and runs every row through every layer. A search method's batch
often feeds only some of its rows (a proposal waiting to be tested, a row holding a fallback): the
others still cost a full pass. `RowLayer` keeps spare room, so a step writes in place, and can run a
step over a subset of rows: they read their own keys and values, and the other rows' new position
stays a hole that the attention mask hides.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def spare_positions(filled: int) -> int:
    """Room added when a layer runs out: a reallocation (one copy of the cache) every this many
    steps, for at most an eighth more memory than the filled part."""
    return max(16, filled // 8)


class RowLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in a buffer with spare positions. `keys` and
    `values` are views of the filled part; assigning either replaces the buffer."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._filled = {"keys": 0, "values": 0}  # apart, so that keys and values are assigned one by one
        self.rows: torch.Tensor | None = None  # when set, a step runs over these rows only
        super().__init__()

    def _view(self, name: str) -> torch.Tensor | None:
        buffer = self._buffers[name]
        return None if buffer is None else buffer[:, :, :self._filled[name]]

    def _assign(self, name: str, tensor: torch.Tensor | None) -> None:
        self._buffers[name] = tensor
        self._filled[name] = 0 if tensor is None or tensor.dim() < 3 else tensor.shape[2]

    keys = property(lambda self: self._view("keys"), lambda self, t: self._assign("keys", t))
    values = property(lambda self: self._view("values"), lambda self, t: self._assign("values", t))

    @property
    def length(self) -> int:
        return self._filled["keys"]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.length == 0:
            if self.rows is not None:
                raise ValueError("a subset step needs a filled cache")
            self.is_initialized = True
            self.device = key_states.device
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        start, end = self.length, self.length + key_states.shape[2]
        for name, new in (("keys", key_states), ("values", value_states)):
            buffer = self._buffers[name]
            if end > buffer.shape[2]:
                buffer = self._buffers[name] = _with_room(buffer, start, end + spare_positions(end))
            if self.rows is None:
                buffer[:, :, start:end] = new
            else:
                buffer[self.rows, :, start:end] = new
            self._filled[name] = end
        if self.rows is None:
            return self.keys, self.values
        # index_select on the filled view: about half the time of advanced indexing on CPU
        return self.keys.index_select(0, self.rows), self.values.index_select(0, self.rows)


def _with_room(tensor: torch.Tensor, filled: int, positions: int) -> torch.Tensor:
    """A copy of `tensor`'s first `filled` positions in a buffer of `positions` (zeros beyond)."""
    batch, heads, _, dim = tensor.shape
    grown = tensor.new_zeros((batch, heads, positions, dim))
    grown[:, :, :filled] = tensor[:, :, :filled]
    return grown


def row_cache(config) -> DynamicCache:
    """A `DynamicCache` for `config` whose plain layers are `RowLayer`s (sliding-window and other
    special layers are kept as transformers makes them)."""
    cache = DynamicCache(config=config)
    cache.layers = [RowLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def steps_subsets(cache: DynamicCache) -> bool:
    """Whether a step of this cache can run over a subset of its rows."""
    return all(isinstance(layer, RowLayer) for layer in cache.layers)


@contextmanager
def only_rows(cache: DynamicCache, rows: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward step reads and writes the cache for `rows` only."""
    for layer in cache.layers:
        layer.rows = rows
    try:
        yield
    finally:
        for layer in cache.layers:
            layer.rows = None
