"""The full-precision K/V of many sessions in one tensor per layer, one row (slot) per session.

Each layer's keys and values are ``(slots, kv_heads, capacity, head_dim)`` tensors, and a session's
:class:`~hf_kvtrade.cache.FullKVCache` is bound to views of its slot, so ``model.forward`` prefills into the pool.
A batched decode step writes all rows' new keys and values with one indexed write per layer and reads
``keys[slots, :, :longest]`` (a view when the slots are one ascending run, else one gather): no per-row work. The
pool counts every slot it allocated, in use or free; a released slot waits for the next session, and when every slot
is taken the pool grows, doubling unless told fewer, and re-binds the live caches.
"""

from __future__ import annotations

import torch
from transformers.configuration_utils import PreTrainedConfig

from ..cache import FullKVCache, kv_cache_bytes


class SlotPool:
    """Slots of ``capacity`` tokens (the context policy's window, which no session's cache exceeds) for the
    :class:`~hf_kvtrade.cache.FullKVCache` sessions of a model with ``config``."""

    def __init__(self, config: PreTrainedConfig, capacity: int, dtype: torch.dtype, device: torch.device | str):
        self.config = config
        self.capacity = capacity
        self.slot_bytes = kv_cache_bytes(config, capacity, dtype)
        shape = (0, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self._caches: list[FullKVCache | None] = []
        self._slot_of: dict[int, int] = {}  # id(cache) -> slot; the cache is referenced by _caches meanwhile

    @property
    def slots(self) -> int:
        return len(self._caches)

    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    def has_free_slot(self) -> bool:
        return len(self._slot_of) < self.slots

    def owns(self, cache) -> bool:
        return id(cache) in self._slot_of

    def acquire(self) -> FullKVCache:
        """An empty cache bound to a free slot (the lowest); grow the pool first when none is free."""
        if not self.has_free_slot():
            raise ValueError(f"all {self.slots} slots are in use: grow the pool or release a slot first")
        slot = self._caches.index(None)
        cache = FullKVCache(self.config, capacity=self.capacity)
        self._bind(cache, slot)
        self._caches[slot] = cache
        self._slot_of[id(cache)] = slot
        return cache

    def release(self, cache: FullKVCache) -> None:
        """Frees the slot of ``cache`` for the next session; ``cache`` must not be used afterwards."""
        slot = self._slot_of.pop(id(cache), None)
        if slot is None:
            raise ValueError("the cache does not hold a slot of this pool")
        self._caches[slot] = None

    def grow(self, slots: int) -> None:
        """Reallocates the pool with ``slots`` (more) slots, copying the current ones and re-binding their caches."""
        for tensors in (self.keys, self.values):
            for layer, old in enumerate(tensors):
                tensors[layer] = old.new_zeros((slots, *old.shape[1:]))
                tensors[layer][: self.slots].copy_(old)
        self._caches.extend([None] * (slots - self.slots))
        for slot, cache in enumerate(self._caches):
            if cache is not None:
                self._bind(cache, slot)

    def slots_of(self, caches: list[FullKVCache]) -> list[int]:
        try:
            return [self._slot_of[id(cache)] for cache in caches]
        except KeyError:
            raise ValueError("every cache of a pooled decode step must hold a slot of the pool") from None

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """Writes row ``r`` of ``key`` and ``value``, ``(rows, kv_heads, head_dim)``, at ``positions[r]`` of
        ``slots[r]``."""
        self.keys[layer][slots, :, positions] = key
        self.values[layer][slots, :, positions] = value

    def read(self, layer: int, slots: list[int], slot_index: torch.Tensor, length: int):
        """The first ``length`` tokens of ``slots`` as ``(rows, kv_heads, length, head_dim)`` keys and values."""
        keys, values = self.keys[layer][:, :, :length], self.values[layer][:, :, :length]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return keys[slots[0] : slots[0] + len(slots)], values[slots[0] : slots[0] + len(slots)]
        return keys.index_select(0, slot_index), values.index_select(0, slot_index)

    def _bind(self, cache: FullKVCache, slot: int) -> None:
        for layer, cache_layer in enumerate(cache.layers):
            cache_layer.bind(self.keys[layer][slot : slot + 1], self.values[layer][slot : slot + 1])


__all__ = ["SlotPool"]
