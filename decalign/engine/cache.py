"""A KV cache for many rows that decode at different times.

transformers' `DynamicCache` concatenates each new position onto the whole cache (a copy of every
row's keys and values per step) and runs every row through every layer. A search method's batch
often feeds only some of its rows (a proposal waiting to be tested, a row holding a fallback): the
others still cost a full pass. `RowLayer` keeps spare room, so a step writes in place, and can run a
step over a subset of rows: they read their own keys and values, and the other rows' new position
stays a hole that the attention mask hides. A batch reserves room for its longest answer when it
starts, and forking, selecting, compacting and joining rows keep that room, so a batch whose steps
stay within it never reallocates its cache (each reallocation copies all of it).

Rows have room too, once a batch has grown (continuous batching): rows that join, or rows added
after the existing ones (a look-ahead's forks), are written into spare rows, and a selection that
keeps its first rows in place moves only the rows after them, so a busy server's batch does not copy
its whole cache each time a request joins or leaves.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..errors import DecalignError


def spare_positions(filled: int) -> int:
    """Room added when a layer runs out: a reallocation (one copy of the cache) every this many
    steps, for at most an eighth more memory than the filled part."""
    return max(16, filled // 8)


def spare_rows(rows: int) -> int:
    """Rows of room added when a layer's rows grow past their room: a quarter more."""
    return max(4, rows // 4)


class RowLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in a buffer with spare positions (and, once it
    has grown, spare rows). `keys` and `values` are views of the used rows' filled part; assigning
    either replaces the buffer."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        # apart, so that keys and values are assigned one by one
        self._filled = {"keys": 0, "values": 0}
        self._used = {"keys": 0, "values": 0}
        self.rows: torch.Tensor | None = None  # when set, a step runs over these rows only
        super().__init__()

    def _view(self, name: str) -> torch.Tensor | None:
        buffer = self._buffers[name]
        return None if buffer is None else buffer[:self._used[name], :, :self._filled[name]]

    def _assign(self, name: str, tensor: torch.Tensor | None) -> None:
        self._buffers[name] = tensor
        self._filled[name] = 0 if tensor is None or tensor.dim() < 3 else tensor.shape[2]
        self._used[name] = 0 if tensor is None or tensor.dim() < 3 else tensor.shape[0]

    keys = property(lambda self: self._view("keys"), lambda self, t: self._assign("keys", t))
    values = property(lambda self: self._view("values"), lambda self, t: self._assign("values", t))

    @property
    def length(self) -> int:
        return self._filled["keys"]

    @property
    def capacity(self) -> int:
        buffer = self._buffers["keys"]
        return 0 if buffer is None else buffer.shape[2]

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
        if end > self.capacity:
            self.reserve(end + spare_positions(end))
        for name, new in (("keys", key_states), ("values", value_states)):
            buffer = self._buffers[name][:self._used[name]]
            if self.rows is None:
                buffer[:, :, start:end] = new
            else:  # the other rows' new positions are holes: zero them, as a buffer's room is never cleared
                buffer[:, :, start:end] = 0
                buffer[self.rows, :, start:end] = new
            self._filled[name] = end
        if self.rows is None:
            return self.keys, self.values
        # index_select on the filled view: about half the time of advanced indexing on CPU
        return self.keys.index_select(0, self.rows), self.values.index_select(0, self.rows)

    def reserve(self, positions: int) -> None:
        """Room for `positions` positions in all, so that steps up to there write in place."""
        if self.is_initialized and positions > self.capacity:
            self._rebuild(lambda name, view, out: out.copy_(view), self.keys.shape[0], self.length, positions,
                          self.row_capacity)

    @property
    def row_capacity(self) -> int:
        buffer = self._buffers["keys"]
        return 0 if buffer is None else buffer.shape[0]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) the rows in `indices`, keeping the room. Where the rows fit the room (fewer
        rows, or forks added after rows that have shrunk before), the leading rows that stay where
        they are are not touched; only the rows after them are written."""
        if self.length == 0:
            return
        used, rows = self._used["keys"], len(indices)
        if rows <= self.row_capacity:
            order = indices.tolist()
            kept = next((i for i, row in enumerate(order) if row != i or i >= used), rows)
            moved = indices[kept:]
            for name in ("keys", "values"):
                if kept < rows:
                    # copied out first: a moved row may be read from a place another is written to
                    self._buffers[name][kept:rows, :, :self.length] = self._view(name).index_select(0, moved)
                self._used[name] = rows
            return
        self._rebuild(lambda name, view, out: torch.index_select(view, 0, indices, out=out), rows, self.length)

    def gather_positions(self, index: torch.Tensor) -> None:
        """Keep, per row, the positions in `index` (rows x width), in that order, keeping the room."""
        self._rebuild(lambda name, view, out: torch.gather(view, 2, index[:, None, :, None].expand_as(out), out=out),
                      index.shape[0], index.shape[1], rows=self.row_capacity)

    def append_rows(self, other: "RowLayer", width: int, capacity: int) -> None:
        """Add `other`'s rows after this layer's, both left-padded with zeros to `width` positions:
        written into spare rows where there are enough and the width is this layer's, else into new
        buffers of `capacity` positions with rows to spare. (Written in place, the rows get no more
        room for positions: the layer grows when a step needs it, by `spare_positions` at a time,
        where reserving a join's whole answer would copy the cache at nearly every join.)"""
        mine, total = self.keys.shape[0], self.keys.shape[0] + other.keys.shape[0]

        def pad_into(part: torch.Tensor, out: torch.Tensor) -> None:
            pad = width - part.shape[2]
            out[:, :, :pad] = 0
            out[:, :, pad:] = part

        if width == self.length and total <= self.row_capacity:
            for name in ("keys", "values"):
                pad_into(getattr(other, name), self._buffers[name][mine:total, :, :width])
                self._used[name] = total
            return

        def fill(name: str, view: torch.Tensor, out: torch.Tensor) -> None:
            pad_into(view, out[:mine])
            pad_into(getattr(other, name), out[mine:])
        self._rebuild(fill, total, width, capacity, rows=total + spare_rows(total))

    def _rebuild(self, fill: Callable[[str, torch.Tensor, torch.Tensor], object], used: int, filled: int,
                 capacity: int = 0, rows: int = 0) -> None:
        """New buffers of max(rows, used) rows and max(capacity, the present room) positions, whose
        first `used` rows' first `filled` positions `fill(name, old view, new view)` writes: one copy
        of the cache."""
        capacity, rows = max(capacity, self.capacity, filled), max(rows, used)
        for name in ("keys", "values"):
            view = self._view(name)
            buffer = new_buffer(view, (rows, view.shape[1], capacity, view.shape[3]))
            fill(name, view, buffer[:used, :, :filled])
            self._buffers[name], self._filled[name], self._used[name] = buffer, filled, used


def new_buffer(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised buffer (never read before it is written: tests fill it with NaN instead)."""
    return like.new_empty(shape)


def row_cache(config) -> DynamicCache:
    """A `DynamicCache` for `config` whose layers are all `RowLayer`s. A sliding-window layer
    becomes one too: transformers' keeps only the window's last positions, which a crop, a join or a
    compaction of the batch's columns cannot follow, so every position is kept and the window is
    applied by the attention mask instead, in token positions (`window_bias`). A model whose cache
    holds anything but keys and values (a recurrent state, layers without attention) is refused."""
    cache = DynamicCache(config=config)
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise DecalignError(f"the model's cache has {type(layer).__name__} layers (a recurrent or shared "
                                "state): decalign's engine needs attention layers with keys and values")
    cache.layers = [RowLayer() for _ in cache.layers]
    return cache


def attention_windows(config) -> dict[str, int | None] | None:
    """For a model with sliding-window layers, each of its layer kinds (transformers' `layer_types`)
    and its window in tokens (None: the whole context); None for a model whose layers all read the
    whole context."""
    config = config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or
                ["sliding_attention" if window and getattr(config, "use_sliding_window", True) else "full_attention"])
    if kinds - {"full_attention", "sliding_attention"}:
        raise DecalignError(f"the model has {', '.join(sorted(kinds - {'full_attention', 'sliding_attention'}))} "
                            "layers: decalign's engine runs full and sliding-window attention only")
    if "sliding_attention" not in kinds:
        return None
    return {kind: window if kind == "sliding_attention" else None for kind in kinds}


def window_bias(bias: torch.Tensor, mask: torch.Tensor, windows: dict[str, int | None]) -> torch.Tensor | dict:
    """The attention biases of a pass (`bias`: rows x 1 x new x width, every layer's causal bias over
    the batch's columns) for each layer kind of `attention_windows`: a sliding-window layer also hides
    the keys `window` tokens or more before the query, counted in tokens (`mask`'s set columns), not
    in columns, which left padding and cropped holes add. One tensor when every layer is of one kind
    (what any model takes), else transformers' mapping of kind to mask."""
    positions = mask.cumsum(-1) - 1  # each column's token position in its row
    new = bias.shape[2]
    distance = positions[:, None, -new:, None] - positions[:, None, None, :]  # rows x 1 x new x width
    lowest = torch.finfo(bias.dtype).min
    biases = {kind: bias if window is None else bias.masked_fill(distance >= window, lowest)
              for kind, window in windows.items()}
    return next(iter(biases.values())) if len(biases) == 1 else biases


def reserve_room(cache: DynamicCache, positions: int) -> None:
    """Room for `positions` positions in every layer."""
    for layer in cache.layers:
        layer.reserve(positions)


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
