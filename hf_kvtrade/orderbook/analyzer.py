"""A streaming order-book analyzer: events in, one forecast of the next mid move per clock tick out.

Each closed tick's three tokens go through the model in ONE forward with the KV cache (int8 by default). When the
context policy moves the anchor, the cache is rebuilt by one prefill of the kept tokens, so the forecasts are those
of a full forward over the policy's context (exactly with the ``full`` cache, to int8 rounding with ``int8``).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..context import ContextPolicy
from ..distribution import DEFAULT_QUANTILES
from .events import order_events
from .features import CLOCK_MS, TickClock
from .tokenizer import OrderBookTokenizer


@dataclass(frozen=True)
class TickForecast:
    """The state at the end of tick ``tick_ms`` and the distribution of the mid's move over the next tick."""

    tick_ms: int
    mid: float
    imbalance: float
    trade_flow: float
    events: int
    probs: np.ndarray = field(repr=False)
    move_prices: np.ndarray = field(repr=False)  # the move of each bin, in price units
    latency_s: float

    @property
    def time(self) -> pd.Timestamp:
        return pd.Timestamp(self.tick_ms, unit="ms", tz="UTC")

    @property
    def prob_up(self) -> float:
        return float(self.probs[self.move_prices > 0].sum())

    @property
    def prob_down(self) -> float:
        return float(self.probs[self.move_prices < 0].sum())

    @property
    def expected_move(self) -> float:
        return float(self.probs @ self.move_prices)

    def mid_quantiles(self, levels=DEFAULT_QUANTILES) -> np.ndarray:
        """Quantiles of the next tick's mid: the smallest bin whose cumulative probability reaches each level."""
        cumulative = np.cumsum(self.probs)
        index = np.minimum(np.searchsorted(cumulative, np.asarray(levels) - 1e-12), len(self.probs) - 1)
        return self.mid + self.move_prices[index]


def merged_events(orders: pd.DataFrame, trades: pd.DataFrame) -> Iterator[tuple[int, bool, tuple]]:
    """``(exchange_timestamp, is_order, fields)`` of a capture's orders and trades in exchange-time order, the orders
    of a millisecond before its trades; ``fields`` are the arguments of ``add_order``/``add_trade`` before the stamp."""
    columns = (trades[column].tolist() for column in ("exchange_timestamp", "side", "amount"))
    trade_rows = ((stamp, False, (side, amount)) for stamp, side, amount in zip(*columns))
    order_rows = ((event[-1], True, event[:-1]) for event in order_events(orders))
    # heapq.merge breaks ties by input order, so at equal stamps the orders come first.
    return heapq.merge(order_rows, trade_rows, key=lambda event: event[0])


class StreamingOrderBookAnalyzer:
    """Consumes order and trade events in exchange-time order and forecasts the next mid move on every tick.

    ``model`` and ``tokenizer`` as ``load_orderbook_model`` returns them; ``cache_policy`` is one of
    :func:`hf_kvtrade.cache.build_cache`; ``clock_ms`` the tick length (the model was trained on 100 ms ticks).
    """

    def __init__(self, model, tokenizer: OrderBookTokenizer, cache_policy: str = "int8", clock_ms: int = CLOCK_MS):
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is not the tokenizer's ({tokenizer.vocab_size})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache_policy = cache_policy
        self.policy = ContextPolicy.from_config(model.config)
        if self.policy.stride % tokenizer.tokens_per_tick:
            raise ValueError(f"the context stride {self.policy.stride} is not a whole number of {tokenizer.tokens_per_tick}-token ticks")
        self.clock = TickClock(clock_ms)
        self.move_prices = tokenizer.move_steps * tokenizer.mid_step
        self._tokens: list[int] = []  # the policy's current context: the history from the anchor on
        self._num_tokens = 0  # tokens in the whole history
        self._anchor = 0
        self._cache = None
        self._previous_mid = float("nan")
        self.rebases = 0

    def add_order(self, order: int, action: str, direction: str, price: float, volume: float, stamp: int) -> list[TickForecast]:
        return self._forecast(self.clock.add_order(order, action, direction, price, volume, stamp))

    def add_trade(self, side: str, amount: float, stamp: int) -> list[TickForecast]:
        return self._forecast(self.clock.add_trade(side, amount, stamp))

    def finish(self) -> TickForecast:
        """Closes the running tick (the stream ended) and forecasts from it."""
        return self._forecast([self.clock.close_tick()])[0]

    def replay(self, orders: pd.DataFrame, trades: pd.DataFrame, speed: float | None = None) -> Iterator[TickForecast]:
        """Feeds a capture's events (:func:`merged_events`) and yields every forecast, the last tick's included.
        ``speed=None`` replays as fast as possible; ``speed=1`` at the events' own pace."""
        if speed is not None and not speed > 0:
            raise ValueError(f"speed must be positive (or None for as fast as possible), got {speed}")
        first_stamp, started = None, time.perf_counter()
        for stamp, is_order, fields in merged_events(orders, trades):
            if speed is not None:
                first_stamp = stamp if first_stamp is None else first_stamp
                time.sleep(max(0.0, (stamp - first_stamp) / 1000 / speed - (time.perf_counter() - started)))
            yield from self.add_order(*fields, stamp) if is_order else self.add_trade(*fields, stamp)
        yield self.finish()

    def cache_bytes(self) -> int:
        return 0 if self._cache is None else self._cache.nbytes()

    @property
    def context_length(self) -> int:
        return len(self._tokens)

    def _forecast(self, closed: list[tuple[int, dict[str, float]]]) -> list[TickForecast]:
        forecasts = []
        for tick_ms, row in closed:
            started = time.perf_counter()
            ids = self.tokenizer.encode_ticks([row["mid"]], [row["imbalance_1"]], [row["ofi"]], self._previous_mid)
            self._previous_mid = row["mid"]
            probs = self.tokenizer.move_distribution(self._append(ids.tolist()))
            forecasts.append(TickForecast(
                tick_ms=tick_ms, mid=row["mid"], imbalance=row["imbalance_1"], trade_flow=row["trade_flow"],
                events=row["events"], probs=probs, move_prices=self.move_prices,
                latency_s=time.perf_counter() - started,
            ))
        return forecasts

    def _append(self, ids: list[int]) -> np.ndarray:
        """Adds one tick's tokens to the context and returns the logits after the last of them."""
        import torch

        from ..cache import build_cache

        self._num_tokens += len(ids)
        anchor = self.policy.start(self._num_tokens)
        self._tokens += ids
        if anchor != self._anchor or self._cache is None:
            # A rebase: the kept tokens are prefilled into a fresh cache from position 0.
            del self._tokens[: anchor - self._anchor]
            self.rebases += self._cache is not None
            self._anchor, self._cache, ids = anchor, build_cache(self.model.config, self.cache_policy), self._tokens
        first = len(self._tokens) - len(ids)
        with torch.inference_mode():
            positions = torch.arange(first, len(self._tokens))[None]
            output = self.model(input_ids=torch.tensor([ids]), position_ids=positions, past_key_values=self._cache,
                                use_cache=True, logits_to_keep=1)
        return output.logits[0, -1].float().numpy()


__all__ = ["StreamingOrderBookAnalyzer", "TickForecast", "merged_events"]
