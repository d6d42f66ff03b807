"""The streaming engine: bars in, forecasts out, one KV-cached session per symbol and one token of compute per tick.

Sessions follow the checkpoint's :class:`~hf_kvtrade.context.ContextPolicy` like ``Forecaster`` and the vLLM clients:
a tick appends one token, and when the policy's anchor moves the cache is rebuilt from it, so every forecast equals
a stateless ``Forecaster``'s. Only ``sink`` departs on purpose: it never rebases, and bounds distances instead. The
``full`` policy decodes all sessions of a step in one pass (:mod:`.decoder`, keys and values in a :mod:`.slots`
pool); the others step each session through ``model.forward``. Design and measurements: docs/streaming.md.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache

from ..cache import CACHE_POLICIES, FullKVCache, PrefixedCache, build_cache, kv_cache_bytes, track_attention
from ..context import ContextPolicy
from ..distribution import DEFAULT_QUANTILES, BinnedDistribution, Forecast
from ..signals import Signal, SignalRule
from ..tokenization_kvtrade import ReturnTokenizer
from .decoder import BatchedDecoder
from .sessions import Session, SessionStore
from .slots import SlotPool
from .summary import ForecastSummarizer


@dataclass
class TickForecast:
    """What ``StreamingForecaster.update`` returns for one bar: the next-bar forecast, its signal and its cost."""

    symbol: str
    timestamp: Any
    forecast: Forecast
    signal: Signal
    latency_ms: float
    context_tokens: int

    @property
    def prob_up(self) -> float:
        return float(self.forecast.prob_up[0])

    @property
    def mean_return(self) -> float:
        return float(self.forecast.mean_return[0])

    @property
    def distribution(self) -> BinnedDistribution:
        return self.forecast.distribution


class StreamingForecaster:
    """Per-symbol KV-cached forecasts of the next bar, one token of compute per tick.

    >>> engine = StreamingForecaster(model, cache_policy="full", memory_budget_bytes=256 << 20)
    >>> engine.set_market_context(index_prices)          # optional, computed once and shared by reference
    >>> tick = engine.update("msft", {"close": 411.2, "timestamp": now})
    >>> ticks = engine.update_many({"msft": 411.2, "aapl": 190.1})   # one batched decode step
    >>> tick.prob_up, tick.signal, tick.latency_ms

    Args:
        model: a ``KVTradeForCausalLM``; it is put in eval mode.
        tokenizer: defaults to the tokenizer of the model's config.
        cache_policy: one of ``CACHE_POLICIES``.
        memory_budget_bytes: cap on the bytes of all session caches together (the shared prefix counted once).
        context_policy: which tokens a forecast conditions on; defaults to the checkpoint's
            (``ContextPolicy.from_config``), the rule every other path follows.
        signal_rule: turns each forecast into a ``Signal``.
        cache_kwargs: passed to ``hf_kvtrade.cache.build_cache`` for the non-``full`` policies.
        prefill_chunk: tokens per forward pass when (re-)building a cache, which bounds prefill memory.
        max_latency_samples: how many of the latest tick latencies ``latency_stats`` summarises.
    """

    def __init__(
        self,
        model,
        tokenizer: ReturnTokenizer | None = None,
        cache_policy: str = "full",
        memory_budget_bytes: int | None = None,
        context_policy: ContextPolicy | None = None,
        quantiles=DEFAULT_QUANTILES,
        signal_rule: SignalRule | None = None,
        cache_kwargs: Mapping[str, Any] | None = None,
        prefill_chunk: int = 1024,
        max_latency_samples: int = 100_000,
    ):
        if cache_policy not in CACHE_POLICIES:
            raise ValueError(f"cache_policy must be one of {CACHE_POLICIES}, got {cache_policy!r}")
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer or ReturnTokenizer.from_config(self.config)
        if self.tokenizer.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} ids but the model has vocab_size {self.config.vocab_size}"
            )
        self.cache_policy = cache_policy
        self.context_policy = context_policy or ContextPolicy.from_config(self.config)
        if self.context_policy.window > self.config.max_position_embeddings:
            raise ValueError(
                f"context window {self.context_policy.window} exceeds the model's max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        self._symbol_policy = self.context_policy
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        full = cache_policy == "full"
        pool = SlotPool(self.config, self.context_policy.window, self.dtype, self.device) if full else None
        self.sessions = SessionStore(memory_budget_bytes, pool)
        self.decoder = BatchedDecoder(self.model, prefill_chunk)
        self.summarize = ForecastSummarizer(self.tokenizer, quantiles)
        self.signal_rule = signal_rule or SignalRule()
        self.cache_kwargs = dict(cache_kwargs or {})
        if cache_policy in ("sink", "selective"):
            # Sized from this engine's policy, which may differ from the checkpoint's.
            self.cache_kwargs.setdefault("context_policy", self.context_policy)
        if self._scores_attention:
            # H2O-style eviction ranks tokens by the attention they receive, which only eager attention reports.
            self.model.set_attn_implementation("eager")
            track_attention(self.model)
        self._prefix_ids: list[int] = []
        self._prefix_cache: FullKVCache | None = None
        self._latencies_ms: deque[float] = deque(maxlen=max_latency_samples)
        self.tokens_computed = 0
        self.prefills = 0

    @property
    def evictions(self) -> int:
        return self.sessions.evictions

    @property
    def peak_cache_bytes(self) -> int:
        return self.sessions.peak_cache_bytes

    @torch.inference_mode()
    def set_market_context(self, prices) -> None:
        """Computes the cache of a market-wide series (e.g. an index) once; every new session reads it by reference.
        Sessions that already exist keep their context until they are rebuilt."""
        if self._scores_attention:
            raise ValueError(
                "a shared market context cannot seed a selective cache that ranks tokens by attention: the shared "
                "prefix has no attention history; use policy='recency' or another cache policy"
            )
        if self.cache_policy == "sink":
            raise ValueError(
                f"cache policy {self.cache_policy!r} bounds query-key distances, which a prefix at fixed positions "
                "would break; use another cache policy with a market context"
            )
        ids = self.tokenizer.encode(prices).tolist()
        symbol_policy = self.context_policy.shifted(len(ids))
        cache = FullKVCache(self.config, capacity=len(ids), dtype=self.dtype, device=self.device)
        self.decoder.prefill(ids, cache, start_position=0)
        self.tokens_computed += len(ids)
        self._prefix_ids, self._prefix_cache, self._symbol_policy = ids, cache, symbol_policy
        self.sessions.prefix_bytes = cache.nbytes()

    @property
    def _scores_attention(self) -> bool:
        return self.cache_policy == "selective" and self.cache_kwargs.get("policy", "hybrid") != "recency"

    @property
    def prefix_length(self) -> int:
        return len(self._prefix_ids)

    def update(self, symbol: str, bar) -> TickForecast:
        """Appends ``bar`` (a price, or a mapping / object with ``close`` and optional ``timestamp``) to the
        session of ``symbol`` and returns the forecast of the next bar."""
        return self.update_many({symbol: bar})[symbol]

    @torch.inference_mode()
    def update_many(self, bars: Mapping[str, Any]) -> dict[str, TickForecast]:
        """Appends one bar to each symbol's session and advances them all in one batched decode step, with the
        forecasts of one ``update`` per symbol. Sessions that are new, evicted or at a rebase are prefilled instead.
        Every tick's ``latency_ms`` is the time of the whole call, when its forecast became available."""
        started = time.perf_counter()
        if not bars:
            raise ValueError("update_many needs at least one bar")
        parsed = {symbol: _parse_bar(bar) for symbol, bar in bars.items()}
        for symbol, (_, timestamp) in parsed.items():
            last = getattr(self.sessions.get(symbol), "last_timestamp", None)
            if timestamp is not None and last is not None and not timestamp > last:
                raise ValueError(f"bar for {symbol!r} at {timestamp} is not after the previous bar at {last}")
        batch = list(parsed)
        sessions = {symbol: self.sessions.open(symbol) for symbol in batch}
        # One tokenizer call for the whole batch: per symbol, its cost rivals a batched step's share.
        moving = [symbol for symbol in batch if sessions[symbol].last_price is not None]
        returns = [math.log(parsed[symbol][0] / sessions[symbol].last_price) for symbol in moving]
        token_ids = dict.fromkeys(batch, self.tokenizer.bos_token_id)
        token_ids.update(zip(moving, self.tokenizer.encode_returns(returns).tolist()))
        stepping = {}
        for symbol, (price, timestamp) in parsed.items():
            session, token_id = sessions[symbol], token_ids[symbol]
            session.token_ids.append(token_id)
            session.last_price, session.last_timestamp = price, timestamp
            if session.cache is not None and self._anchor_of(session) == session.anchor:
                stepping[symbol] = token_id
        for symbol in batch:
            if symbol not in stepping:
                self._rebuild(self.sessions[symbol], keep=batch)
        if stepping:
            self._step(stepping)
        self.sessions.enforce(self._growth_headroom(), keep=batch)
        ticks = self._ticks(batch, started)
        self._latencies_ms.extend(tick.latency_ms for tick in ticks.values())
        return ticks

    @torch.inference_mode()
    def prime(self, symbol: str, prices, timestamps=None) -> TickForecast:
        """Starts the session of ``symbol`` from a history of prices in one prefill (e.g. before going live), with
        the forecast bar-by-bar ``update`` calls (and ``Forecaster.predict``) give for the same prices."""
        if symbol in self.sessions:
            raise ValueError(f"symbol {symbol!r} already has a session; prime only new symbols")
        started = time.perf_counter()
        prices = np.asarray(prices, dtype=np.float64)
        session = Session(token_ids=self.tokenizer.encode(prices, timestamps).tolist())
        session.last_price = float(prices[-1])
        session.last_timestamp = None if timestamps is None else timestamps[-1]
        self.sessions.open(symbol, session)
        self._rebuild(session, keep=(symbol,))
        self.sessions.enforce(self._growth_headroom(), keep=(symbol,))
        return self._ticks([symbol], started)[symbol]

    @torch.inference_mode()
    def forecast(self, symbol: str) -> TickForecast:
        """The forecast after the symbol's latest bar; an evicted session is re-prefilled from its history."""
        started = time.perf_counter()
        session = self.sessions.get(symbol)
        if session is None or not session.token_ids:
            raise ValueError(f"no bars seen for symbol {symbol!r}")
        self.sessions.open(symbol)
        if session.cache is None:
            self._rebuild(session, keep=(symbol,))
            self.sessions.enforce(self._growth_headroom(), keep=(symbol,))
        return self._ticks([symbol], started)[symbol]

    def _ticks(self, symbols: list[str], started: float) -> dict[str, TickForecast]:
        """The forecasts after each symbol's latest bar, summarised together, each with the latency since
        ``started``: when its forecast became available."""
        sessions = [self.sessions[symbol] for symbol in symbols]
        logits = torch.stack([session.last_logits for session in sessions])
        forecasts = self.summarize(logits, [session.last_price for session in sessions])
        signals = [self.signal_rule(forecast) for forecast in forecasts]
        latency_ms = (time.perf_counter() - started) * 1e3
        return {
            symbol: TickForecast(
                symbol=symbol,
                timestamp=session.last_timestamp,
                forecast=forecast,
                signal=signal,
                latency_ms=latency_ms,
                context_tokens=self.prefix_length + session.tokens_in_cache,
            )
            for symbol, session, forecast, signal in zip(symbols, sessions, forecasts, signals)
        }

    def _anchor_of(self, session: Session) -> int:
        """Where the symbol's context starts: the policy's anchor, or the stream's start for a sink cache, which bounds
        its own query-key distances over an endless stream."""
        return 0 if self.cache_policy == "sink" else self._symbol_policy.start(len(session.token_ids))

    def _rebuild(self, session: Session, keep: Collection[str]) -> None:
        """(Re-)prefills the session's context behind the shared prefix and keeps its last logits."""
        self.sessions.drop_cache(session)
        session.anchor = self._anchor_of(session)
        window = session.token_ids[session.anchor :]
        # Full caches behind a market prefix have a shorter window than the slots: they get caches of their own.
        if self.sessions.pool is not None and self._prefix_cache is None:
            self.sessions.reserve_slot(keep)
            cache = self.sessions.pool.acquire()
        else:
            self.sessions.reserve(self._projected_bytes(len(window)), keep)
            cache = self._new_cache()
        session.cache = cache
        if self._prefix_cache is not None:
            cache = PrefixedCache(self._prefix_cache, cache)
            if self.cache_policy != "full":
                # model.forward steps it from now on; the full policy's decoder reads the prefix itself.
                session.cache = cache
        session.last_logits = self.decoder.prefill(window, cache, start_position=self.prefix_length)
        self.tokens_computed += len(window)
        self.prefills += 1

    def _new_cache(self) -> Cache:
        if self.cache_policy == "full":
            return FullKVCache(self.config, capacity=self._symbol_policy.window, dtype=self.dtype, device=self.device)
        return build_cache(self.config, self.cache_policy, **self.cache_kwargs)

    def _projected_bytes(self, num_tokens: int) -> int:
        """Upper bound on a new session's bytes: what it allocates (full), else its tokens at full precision."""
        if self.cache_policy == "full":
            return kv_cache_bytes(self.config, self._symbol_policy.window, self.dtype)
        most_held = self._new_cache().get_max_length()  # -1: no bound
        tokens = min(num_tokens, most_held) if most_held > 0 else num_tokens
        return kv_cache_bytes(self.config, tokens + 1, self.dtype)

    def _growth_headroom(self) -> int:
        """Room a growing cache (quantized, selective) needs for its next token; a full cache never grows."""
        return 0 if self.cache_policy == "full" else kv_cache_bytes(self.config, 1, self.dtype)

    def _step(self, token_ids: Mapping[str, int]) -> None:
        """One new token for each session of ``token_ids``: one batched pass (full), else one forward each."""
        sessions = [self.sessions[symbol] for symbol in token_ids]
        if self.cache_policy == "full":
            caches = [session.cache for session in sessions]
            logits = self.decoder.step(list(token_ids.values()), caches, self._prefix_cache, self.sessions.pool)
            for session, row in zip(sessions, logits):
                session.last_logits = row
        else:
            for session, token_id in zip(sessions, token_ids.values()):
                # At the cache's count of tokens seen (prefix included), which is what sink caches re-rotate against.
                position = session.cache.get_seq_length()
                session.last_logits = self.decoder.prefill([token_id], session.cache, start_position=position)
        self.tokens_computed += len(sessions)

    def session_bytes(self, symbol: str) -> int:
        return self.sessions.session_bytes(symbol)

    def cache_bytes(self) -> int:
        """Bytes of all live caches: the shared prefix once plus every resident session's own tokens."""
        return self.sessions.cache_bytes()

    def evict(self, symbol: str) -> None:
        """Drops the cache of ``symbol`` (its history stays; it is re-prefilled on its next bar)."""
        self.sessions.evict(symbol)

    def session_cache(self, symbol: str) -> Cache | None:
        """The live cache of ``symbol`` (None when evicted); for inspection, not for mutation."""
        return self.sessions[symbol].cache if symbol in self.sessions else None

    def is_resident(self, symbol: str) -> bool:
        return symbol in self.sessions and self.sessions[symbol].cache is not None

    def history(self, symbol: str) -> list[int]:
        """Every token id the symbol has produced (what an evicted session is re-prefilled from)."""
        return list(self.sessions[symbol].token_ids) if symbol in self.sessions else []

    def context_ids(self, symbol: str) -> list[int]:
        """The token ids the symbol's forecast is conditioned on: market prefix, then its cached tokens."""
        session = self.sessions[symbol]
        anchor = session.anchor if session.cache is not None else self._anchor_of(session)
        return self._prefix_ids + session.token_ids[anchor:]

    def latency_stats(self) -> dict[str, float]:
        """Per-tick latency percentiles (milliseconds) over the most recent ticks, and cache sizes in bytes."""
        latencies = np.asarray(self._latencies_ms)
        stats = {"ticks": int(latencies.size), "cache_bytes": self.cache_bytes(), "peak_cache_bytes": self.peak_cache_bytes}
        if latencies.size:
            p50, p99 = np.percentile(latencies, [50, 99])
            stats.update(p50_ms=float(p50), p99_ms=float(p99), mean_ms=float(latencies.mean()))
        return stats

    @property
    def latencies_ms(self) -> np.ndarray:
        return np.asarray(self._latencies_ms)

    async def consume(
        self, feeds: Mapping[str, asyncio.Queue], signals: asyncio.Queue | None = None
    ) -> list[TickForecast]:
        """Consumes one queue of bars per symbol until each yields ``None``; emits every tick to ``signals`` and
        returns them in the order computed. Ticks run on the event loop one at a time (the engine is not
        thread-safe, and a step is short); the loop gets control back between ticks."""
        ticks: list[TickForecast] = []

        async def follow(symbol: str, queue: asyncio.Queue) -> None:
            while (bar := await queue.get()) is not None:
                tick = self.update(symbol, bar)
                ticks.append(tick)
                if signals is not None:
                    await signals.put(tick)
                await asyncio.sleep(0)

        await asyncio.gather(*(follow(symbol, queue) for symbol, queue in feeds.items()))
        return ticks


def _parse_bar(bar) -> tuple[float, Any]:
    if isinstance(bar, Mapping):
        if "close" not in bar:
            raise ValueError(f"bar mapping has no 'close' key: {sorted(bar)}")
        price, timestamp = bar["close"], bar.get("timestamp")
    elif hasattr(bar, "close"):
        price, timestamp = bar.close, getattr(bar, "timestamp", None)
    else:
        price, timestamp = bar, None
    try:
        price = float(price)
    except (TypeError, ValueError):
        raise ValueError(f"bar close must be a number, got {price!r}") from None
    if not (math.isfinite(price) and price > 0):
        raise ValueError(f"bar close must be positive and finite, got {price}")
    return price, timestamp


__all__ = ["StreamingForecaster", "TickForecast"]
