"""Streaming forecasts: one KV-cached session per symbol, one new token per bar, a forecast for every tick.

Each session keeps its symbol's token history and a cache of its keys and values, so a new bar costs one token of
compute whatever the history length. The ``full`` policy decodes into preallocated K/V buffers through the model's
own decoder layers, skipping the per-call mask and output bookkeeping of ``model.forward`` that dominates a
one-token step on a CPU; the other policies (``int8``, ``int4``, ``sink``, ``selective``) use the caches of
``hf_kvtrade.cache`` through ``model.forward``.

Sessions share the engine's memory budget: when a new cache would not fit, the least recently used session drops
its cache (its token history stays) and is re-prefilled from that history when its symbol returns.

Which tokens a session conditions on is the checkpoint's :class:`~hf_kvtrade.context.ContextPolicy`, the rule
``Forecaster`` and the vLLM clients follow too: between rebases a tick appends one token to the cache, and when the
policy's anchor moves the cache is rebuilt from the new anchor. A session therefore gives, at every bar, the
forecast a stateless ``Forecaster`` gives for the same prices. Only the ``sink`` cache departs from it on purpose:
it is the alternative for endless streams without rebase ticks, sized so that no query-key distance exceeds the
policy's window.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, StaticLayer

from .cache import CACHE_POLICIES, build_cache, track_attention
from .context import ContextPolicy
from .distribution import BinnedDistribution
from .distribution import DEFAULT_QUANTILES, Forecast
from .signals import Signal, SignalRule
from .tokenization_kvtrade import ReturnTokenizer

# Caches that bound their own query-key distances, so a session runs over an endless stream without rebasing.
BOUNDED_POLICIES = ("sink",)


class PreallocatedKVLayer(StaticLayer):
    """A ``StaticLayer`` that returns only the filled part of its buffers.

    ``StaticLayer`` hands attention the whole ``max_cache_len`` buffer plus a mask, so every step pays for the
    longest possible history. Returning views of the filled prefix makes the cost follow the real history, and a
    single query token then needs no mask at all.
    """

    def __init__(self, max_cache_len: int):
        super().__init__(max_cache_len=max_cache_len)
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        self.keys = torch.zeros(*shape, self.k_head_dim, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(*shape, self.v_head_dim, dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.cumulative_length
        end = start + key_states.shape[-2]
        if end > self.max_cache_len:
            raise ValueError(f"cache holds at most {self.max_cache_len} tokens; writing tokens {start}..{end - 1}")
        self.keys[:, :, start:end].copy_(key_states)
        self.values[:, :, start:end].copy_(value_states)
        self.cumulative_length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        self.cumulative_length = 0

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes if self.is_initialized else 0


class PreallocatedKVCache(Cache):
    """K/V buffers for ``max_cache_len`` tokens per layer, allocated up front so a decode step never allocates."""

    def __init__(self, config, max_cache_len: int, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__(layers=[PreallocatedKVLayer(max_cache_len) for _ in range(config.num_hidden_layers)])
        self.early_initialization(1, config.num_key_value_heads, config.head_dim, dtype, torch.device(device))

    @staticmethod
    def bytes_for(config, max_cache_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes such a cache allocates, known before allocating it (for the memory budget)."""
        element_size = torch.empty((), dtype=dtype).element_size()
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element_size
        return per_token * max_cache_len

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def num_tokens_held(self) -> int:
        return self.get_seq_length()


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


@dataclass
class _Session:
    token_ids: list[int] = field(default_factory=list)
    last_price: float | None = None
    last_timestamp: Any = None
    cache: Cache | None = None
    last_logits: torch.Tensor | None = None
    # Index in token_ids of the first token the cache holds after the market prefix (the policy's anchor).
    anchor: int = 0

    @property
    def tokens_in_cache(self) -> int:
        return 0 if self.cache is None else len(self.token_ids) - self.anchor


class StreamingForecaster:
    """Per-symbol KV-cached forecasts of the next bar, one token of compute per tick.

    >>> engine = StreamingForecaster(model, cache_policy="full", memory_budget_bytes=256 << 20)
    >>> engine.set_market_context(index_prices)          # optional, computed once and shared
    >>> tick = engine.update("msft", {"close": 411.2, "timestamp": now})
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
        compile: compile the one-token decode step with ``torch.compile`` (``full`` policy only).
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
        compile: bool = False,
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
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be positive, got {memory_budget_bytes}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if compile and cache_policy != "full":
            raise ValueError("compile=True applies to the lean decode path of the 'full' policy only")
        self.memory_budget_bytes = memory_budget_bytes
        self.quantiles = tuple(quantiles)
        self.signal_rule = signal_rule or SignalRule()
        self.cache_kwargs = dict(cache_kwargs or {})
        if cache_policy in ("sink", "selective"):
            # Sized from this engine's policy, which may differ from the checkpoint's.
            self.cache_kwargs.setdefault("context_policy", self.context_policy)
        self.prefill_chunk = int(prefill_chunk)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        if self._scores_attention:
            # H2O-style eviction ranks tokens by the attention they receive, which only eager attention reports.
            self.model.set_attn_implementation("eager")
            track_attention(self.model)
        self._decode = torch.compile(self._decode_step, dynamic=True) if compile else self._decode_step
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self._prefix_ids: list[int] = []
        self._prefix_cache: PreallocatedKVCache | None = None
        self._latencies_ms: deque[float] = deque(maxlen=max_latency_samples)
        self.tokens_computed = 0
        self.evictions = 0
        self.prefills = 0
        self.peak_cache_bytes = 0

    # ------------------------------------------------------------------------------------------- market prefix
    @torch.inference_mode()
    def set_market_context(self, prices) -> None:
        """Computes the cache of a market-wide series (e.g. an index) once; every new session starts from a copy.

        Sessions that already exist keep the context they started with.
        """
        if self._scores_attention:
            raise ValueError(
                "a shared market context cannot seed a selective cache that ranks tokens by attention: the copied "
                "prefix has no attention history; use policy='recency' or another cache policy"
            )
        ids = self.tokenizer.encode(prices).tolist()
        symbol_policy = self.context_policy.shifted(len(ids))
        cache = PreallocatedKVCache(self.config, len(ids), self.dtype, self.device)
        self._run_prefill(ids, cache, start_position=0)
        self._prefix_ids, self._prefix_cache, self._symbol_policy = ids, cache, symbol_policy

    @property
    def _scores_attention(self) -> bool:
        return self.cache_policy == "selective" and self.cache_kwargs.get("policy", "hybrid") != "recency"

    @property
    def prefix_length(self) -> int:
        return len(self._prefix_ids)

    # ------------------------------------------------------------------------------------------------- ticks
    @torch.inference_mode()
    def update(self, symbol: str, bar) -> TickForecast:
        """Appends ``bar`` (a price, or a mapping / object with ``close`` and optional ``timestamp``) to the
        session of ``symbol`` and returns the forecast of the next bar."""
        started = time.perf_counter()
        price, timestamp = _parse_bar(bar)
        session = self._sessions.get(symbol)
        if session is None:
            session = self._sessions[symbol] = _Session()
        if timestamp is not None and session.last_timestamp is not None and not timestamp > session.last_timestamp:
            raise ValueError(
                f"bar for {symbol!r} at {timestamp} is not after the previous bar at {session.last_timestamp}"
            )
        if session.last_price is None:
            token_id = self.tokenizer.bos_token_id
        else:
            token_id = int(self.tokenizer.encode_returns([math.log(price / session.last_price)])[0])
        session.token_ids.append(token_id)
        session.last_price, session.last_timestamp = price, timestamp
        self._sessions.move_to_end(symbol)

        if session.cache is None or self._anchor_of(session) != session.anchor:
            logits = self._rebuild(symbol, session)
        else:
            logits = self._step(session, token_id)
        session.last_logits = logits
        tick = self._tick(symbol, session, logits, started)
        self._latencies_ms.append(tick.latency_ms)
        return tick

    @torch.inference_mode()
    def prime(self, symbol: str, prices, timestamps=None) -> TickForecast:
        """Starts the session of ``symbol`` from a history of prices in one prefill (e.g. before going live).

        The context follows the policy, so the forecast equals what bar-by-bar ``update`` calls over the same
        prices give at the end, and what ``Forecaster.predict`` gives for them.
        """
        if symbol in self._sessions:
            raise ValueError(f"symbol {symbol!r} already has a session; prime only new symbols")
        started = time.perf_counter()
        prices = np.asarray(prices, dtype=np.float64)
        session = self._sessions[symbol] = _Session(token_ids=self.tokenizer.encode(prices, timestamps).tolist())
        session.last_price = float(prices[-1])
        session.last_timestamp = None if timestamps is None else timestamps[-1]
        session.last_logits = self._rebuild(symbol, session)
        return self._tick(symbol, session, session.last_logits, started)

    @torch.inference_mode()
    def forecast(self, symbol: str) -> TickForecast:
        """The forecast after the symbol's latest bar; an evicted session is re-prefilled from its history."""
        started = time.perf_counter()
        session = self._sessions.get(symbol)
        if session is None or not session.token_ids:
            raise ValueError(f"no bars seen for symbol {symbol!r}")
        self._sessions.move_to_end(symbol)
        logits = self._rebuild(symbol, session) if session.cache is None else session.last_logits
        return self._tick(symbol, session, logits, started)

    def _tick(self, symbol: str, session: _Session, logits: torch.Tensor, started: float) -> TickForecast:
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        distribution = BinnedDistribution.from_token_probs(probs, self.tokenizer)
        forecast = Forecast.from_distribution(distribution, session.last_price, self.quantiles)
        return TickForecast(
            symbol=symbol,
            timestamp=session.last_timestamp,
            forecast=forecast,
            signal=self.signal_rule(forecast),
            latency_ms=(time.perf_counter() - started) * 1e3,
            context_tokens=self.prefix_length + session.tokens_in_cache,
        )

    # ------------------------------------------------------------------------------------ cache construction
    def _anchor_of(self, session: _Session) -> int:
        """Where the symbol's context starts: the policy's anchor, or the stream's start for a sink cache."""
        if self.cache_policy in BOUNDED_POLICIES:
            return 0
        return self._symbol_policy.start(len(session.token_ids))

    def _rebuild(self, symbol: str, session: _Session) -> torch.Tensor:
        """(Re-)prefills the session from the market prefix and its context; returns the last logits."""
        session.cache = None
        session.anchor = self._anchor_of(session)
        window = session.token_ids[session.anchor :]
        cache = self._new_cache()
        self._reserve(symbol, self._projected_bytes(cache, len(window)))
        session.cache = cache
        if self._prefix_cache is not None:
            # Copy-on-write: the prefix tensors are copied into the session's own cache, never recomputed.
            for layer_idx, prefix_layer in enumerate(self._prefix_cache.layers):
                session.cache.update(prefix_layer.keys, prefix_layer.values, layer_idx)
        logits = self._run_prefill(window, session.cache, start_position=self.prefix_length)
        self.prefills += 1
        self._enforce_budget(symbol)
        return logits

    def _new_cache(self) -> Cache:
        if self.cache_policy == "full":
            return PreallocatedKVCache(self.config, self.context_policy.window, self.dtype, self.device)
        return build_cache(self.config, self.cache_policy, **self.cache_kwargs)

    def _run_prefill(self, ids: list[int], cache: Cache, start_position: int) -> torch.Tensor:
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = torch.tensor([ids[start : start + self.prefill_chunk]], device=self.device)
            positions = torch.arange(chunk.shape[1], device=self.device) + start_position + start
            output = self.model(
                input_ids=chunk,
                position_ids=positions.unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = output.logits[0, -1]
        self.tokens_computed += len(ids)
        return logits

    # ------------------------------------------------------------------------------------------ decode steps
    def _step(self, session: _Session, token_id: int) -> torch.Tensor:
        position = self.prefix_length + session.tokens_in_cache - 1
        input_ids = torch.tensor([[token_id]], device=self.device)
        if self.cache_policy == "full":
            logits = self._decode(input_ids, torch.tensor([[position]], device=self.device), session.cache)
        else:
            # Positions come from the cache's count of tokens seen, which is what sink caches re-rotate against.
            logits = self.model(input_ids=input_ids, past_key_values=session.cache, use_cache=True, logits_to_keep=1)
            logits = logits.logits[0, -1]
        self.tokens_computed += 1
        self._enforce_budget(None)
        return logits

    def _decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One token through the model's own modules. A single query sees every cached token, so no mask."""
        decoder = self.model.model
        hidden_states = decoder.embed_tokens(input_ids)
        position_embeddings = decoder.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in decoder.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(
                hidden_states,
                attention_mask=None,
                position_ids=position_ids,
                past_key_values=cache,
                position_embeddings=position_embeddings,
            )
        return self.model.lm_head(decoder.norm(hidden_states))[0, -1]

    # ------------------------------------------------------------------------------------------ memory budget
    def _per_token_bytes(self) -> int:
        return PreallocatedKVCache.bytes_for(self.config, 1, self.dtype)

    def _projected_bytes(self, cache: Cache, num_tokens: int) -> int:
        """Upper bound on a new session's bytes: what it allocates (full), else its tokens at full precision."""
        if self.cache_policy == "full":
            return PreallocatedKVCache.bytes_for(self.config, self.context_policy.window, self.dtype)
        tokens = self.prefix_length + num_tokens + 1
        most_held = cache.layers[0].get_max_length()
        if most_held > 0:
            tokens = min(tokens, most_held + 1)
        return self._per_token_bytes() * tokens

    def session_bytes(self, symbol: str) -> int:
        session = self._sessions.get(symbol)
        return 0 if session is None or session.cache is None else int(session.cache.nbytes())

    def cache_bytes(self) -> int:
        """Bytes of all live caches: the shared prefix once plus every resident session."""
        prefix = self._prefix_cache.nbytes() if self._prefix_cache is not None else 0
        return prefix + sum(self.session_bytes(symbol) for symbol in self._sessions)

    def _reserve(self, symbol: str, needed: int) -> None:
        if self.memory_budget_bytes is None:
            return
        prefix = self._prefix_cache.nbytes() if self._prefix_cache is not None else 0
        if prefix + needed > self.memory_budget_bytes:
            raise ValueError(
                f"memory_budget_bytes={self.memory_budget_bytes} cannot hold one session ({needed} bytes) plus the "
                f"market prefix ({prefix} bytes)"
            )
        while self.cache_bytes() + needed > self.memory_budget_bytes:
            self._evict_least_recent(keep=symbol)

    def _enforce_budget(self, keep: str | None) -> None:
        """Growing caches (quantized, selective) are checked after each step; sessions are evicted LRU first."""
        if self.memory_budget_bytes is not None and self.cache_policy != "full":
            keep = keep or next(reversed(self._sessions))
            while self.cache_bytes() + self._per_token_bytes() > self.memory_budget_bytes:
                if not self._evict_least_recent(keep=keep):
                    break
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())

    def _evict_least_recent(self, keep: str) -> bool:
        for symbol, session in self._sessions.items():
            if symbol != keep and session.cache is not None:
                session.cache = None
                self.evictions += 1
                return True
        return False

    def evict(self, symbol: str) -> None:
        """Drops the cache of ``symbol`` (its history stays; it is re-prefilled on its next bar)."""
        if symbol not in self._sessions:
            raise ValueError(f"unknown symbol {symbol!r}")
        session = self._sessions[symbol]
        if session.cache is not None:
            session.cache = None
            self.evictions += 1

    def session_cache(self, symbol: str) -> Cache | None:
        """The live cache of ``symbol`` (None when evicted); for inspection, not for mutation."""
        return self._sessions[symbol].cache if symbol in self._sessions else None

    def is_resident(self, symbol: str) -> bool:
        return symbol in self._sessions and self._sessions[symbol].cache is not None

    @property
    def symbols(self) -> list[str]:
        return list(self._sessions)

    def history(self, symbol: str) -> list[int]:
        """Every token id the symbol has produced (what an evicted session is re-prefilled from)."""
        return list(self._sessions[symbol].token_ids) if symbol in self._sessions else []

    def context_ids(self, symbol: str) -> list[int]:
        """The token ids the symbol's forecast is conditioned on: market prefix, then its cached tokens."""
        session = self._sessions[symbol]
        anchor = session.anchor if session.cache is not None else self._anchor_of(session)
        return self._prefix_ids + session.token_ids[anchor:]

    # ------------------------------------------------------------------------------------------------- stats
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

    # ------------------------------------------------------------------------------------------------ asyncio
    async def consume(
        self, feeds: Mapping[str, asyncio.Queue], signals: asyncio.Queue | None = None
    ) -> list[TickForecast]:
        """Consumes one queue of bars per symbol until each yields ``None``; emits every tick to ``signals``.

        The model step is short and the engine is not thread-safe, so ticks run on the event loop one at a time;
        the loop gets control back between ticks. Returns the ticks in the order they were computed.
        """
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


__all__ = [
    "CACHE_POLICIES",
    "PreallocatedKVCache",
    "PreallocatedKVLayer",
    "StreamingForecaster",
    "TickForecast",
]
