"""Per-symbol sessions and the memory budget their caches share, with least-recently-used eviction.

A session keeps its symbol's whole token history and, while resident, a KV cache of its current context. Bytes are
the caches' own ``nbytes()``, the shared prefix once, and a :class:`~hf_kvtrade.streaming.slots.SlotPool` as a whole
(free slots included: the pool keeps them). Evicting drops a cache (freeing its slot) and keeps the history, from
which the engine re-prefills the session when its symbol returns.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from .slots import SlotPool


@dataclass
class Session:
    token_ids: list[int] = field(default_factory=list)
    last_price: float | None = None
    last_timestamp: Any = None
    cache: Cache | None = None
    last_logits: torch.Tensor | None = None
    # Index in token_ids of the first token the cache holds after the shared prefix (the policy's anchor).
    anchor: int = 0

    @property
    def tokens_in_cache(self) -> int:
        return 0 if self.cache is None else len(self.token_ids) - self.anchor


class SessionStore(OrderedDict[str, Session]):
    """Sessions by symbol, least recently used first, under ``budget_bytes`` (None: no cap) for every resident cache
    plus the shared prefix; ``pool`` holds the pooled sessions' caches."""

    def __init__(self, budget_bytes: int | None = None, pool: SlotPool | None = None):
        super().__init__()
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.prefix_bytes = 0
        self.evictions = 0
        self.peak_cache_bytes = 0
        self.pool = pool

    def open(self, symbol: str, session: Session | None = None) -> Session:
        """The session of ``symbol`` (a new one when it has none), marked most recently used."""
        if symbol not in self:
            self[symbol] = session or Session()
        self.move_to_end(symbol)
        return self[symbol]

    def session_bytes(self, symbol: str) -> int:
        session = self.get(symbol)
        return 0 if session is None or session.cache is None else int(session.cache.nbytes())

    def cache_bytes(self) -> int:
        pooled = 0 if self.pool is None else self.pool.nbytes()
        return self.prefix_bytes + pooled + sum(
            self.session_bytes(symbol)
            for symbol, session in self.items()
            if not (self.pool is not None and self.pool.owns(session.cache))
        )

    def reserve_slot(self, keep: Collection[str]) -> None:
        """Makes a slot of the pool free: grows the pool (doubling, or as far as the budget allows) or evicts least
        recently used sessions outside ``keep``."""
        pool = self.pool
        self._check_fits(pool.slot_bytes)
        while not pool.has_free_slot():
            growth = max(pool.slots, 1)
            if self.budget_bytes is not None:
                growth = min(growth, (self.budget_bytes - self.cache_bytes()) // pool.slot_bytes)
            if growth > 0:
                pool.grow(pool.slots + growth)
            elif not self._evict_least_recent(keep):
                raise ValueError(self._batch_too_large(keep, pool.slot_bytes))

    def reserve(self, needed: int, keep: Collection[str]) -> None:
        """Evicts least recently used sessions outside ``keep`` until a new cache of ``needed`` bytes fits."""
        if self.budget_bytes is None:
            return
        self._check_fits(needed)
        while self.cache_bytes() + needed > self.budget_bytes:
            if not self._evict_least_recent(keep):
                raise ValueError(self._batch_too_large(keep, needed))

    def _check_fits(self, needed: int) -> None:
        if self.budget_bytes is not None and self.prefix_bytes + needed > self.budget_bytes:
            raise ValueError(
                f"memory_budget_bytes={self.budget_bytes} cannot hold one session ({needed} bytes) plus the "
                f"market prefix ({self.prefix_bytes} bytes)"
            )

    def _batch_too_large(self, keep: Collection[str], needed: int) -> str:
        return (
            f"memory_budget_bytes={self.budget_bytes} cannot hold the {len(keep)} sessions of one batch "
            f"(another {needed} bytes on top of {self.cache_bytes()}): raise the budget or send fewer symbols"
        )

    def enforce(self, headroom: int, keep: Collection[str]) -> None:
        """Keeps ``headroom`` bytes free for caches that grow, evicting sessions outside ``keep``; records the peak."""
        if self.budget_bytes is not None:
            while self.cache_bytes() + headroom > self.budget_bytes and self._evict_least_recent(keep):
                pass
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())

    def evict(self, symbol: str) -> None:
        if symbol not in self:
            raise ValueError(f"unknown symbol {symbol!r}")
        session = self[symbol]
        if session.cache is not None:
            self.drop_cache(session)
            self.evictions += 1

    def drop_cache(self, session: Session) -> None:
        """Forgets the session's cache (before a rebuild, or as an eviction), freeing its slot if it holds one."""
        if self.pool is not None and self.pool.owns(session.cache):
            self.pool.release(session.cache)
        session.cache = None

    def _evict_least_recent(self, keep: Collection[str]) -> bool:
        for symbol, session in self.items():
            if symbol not in keep and session.cache is not None:
                self.evict(symbol)
                return True
        return False


__all__ = ["Session", "SessionStore"]
