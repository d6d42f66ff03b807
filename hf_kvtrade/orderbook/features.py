"""Microstructure features of a replayed book on a fixed 100 ms clock (why 100 ms: docs/orderbook.md).

Tick ``t`` (ms, a multiple of the clock) covers events with ``t - clock < exchange_timestamp <= t``; its book
features are the book after the last of them, so a tick depends only on events up to its own time.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .book import OrderBook
from .events import order_events

CLOCK_MS = 100
IMBALANCE_LEVELS = (1, 5, 20)


def snapshot_rows(orders: pd.DataFrame) -> int:
    """Rows of the leading snapshot: the ``created`` rows sharing the first exchange timestamp."""
    stamps = orders["exchange_timestamp"].to_numpy()
    same = (stamps == stamps[0]) & (orders["action"].to_numpy() == "created")
    return len(same) if same.all() else int(np.argmin(same))


def _touch(book: OrderBook) -> tuple[float, float, float, float]:
    """``(bid, bid size, ask, ask size)``; an empty side is (nan, 0), which makes its OFI terms vanish."""
    bid, ask = book.best_bid, book.best_ask
    return (math.nan if bid is None else bid, book.bids.get(bid, 0.0), math.nan if ask is None else ask,
            book.asks.get(ask, 0.0))


def ofi_term(before: tuple[float, float, float, float], after: tuple[float, float, float, float]) -> float:
    """Cont, Kukanov & Stoikov (2014) order-flow imbalance of one event, from (bid, bid size, ask, ask size)
    before and after it: bid size added at an equal or better bid counts +, removed at an equal or worse bid -,
    and the mirror for the ask."""
    pb0, qb0, pa0, qa0 = before
    pb1, qb1, pa1, qa1 = after
    return ((pb1 >= pb0) * qb1 - (pb1 <= pb0) * qb0 - (pa1 <= pa0) * qa1 + (pa1 >= pa0) * qa0)


def _imbalance(book: OrderBook, levels: int) -> float:
    bid = sum(volume for _, volume in book.depth("bid", levels))
    ask = sum(volume for _, volume in book.depth("ask", levels))
    return (bid - ask) / (bid + ask) if bid + ask > 0 else math.nan


def _row(book: OrderBook) -> dict[str, float]:
    bid, bid_size, ask, ask_size = _touch(book)
    size = bid_size + ask_size
    return {"mid": (bid + ask) / 2, "spread": ask - bid,
            "microprice": (bid * ask_size + ask * bid_size) / size if size > 0 else math.nan,
            **{f"imbalance_{n}": _imbalance(book, n) for n in IMBALANCE_LEVELS}}  # fmt: skip


class TickClock:
    """The book and the running tick of an event stream: what :func:`features` computes, one event at a time.

    ``add_order`` and ``add_trade`` take events in exchange-time order and return the ``(tick_ms, row)`` pairs of
    the ticks the event closed (several when the stream skipped empty ticks).
    """

    def __init__(self, clock_ms: int = CLOCK_MS):
        if clock_ms < 1:
            raise ValueError(f"clock_ms must be a positive number of milliseconds, got {clock_ms}")
        self.clock_ms = clock_ms
        self.book = OrderBook()
        self.tick: int | None = None
        self._first_stamp: int | None = None
        self._ofi = self._trade_flow = 0.0
        self._events = 0
        self._snapshot_over = False

    def _advance(self, stamp: int) -> list[tuple[int, dict[str, float]]]:
        if self.tick is None:
            self.tick = -(-int(stamp) // self.clock_ms) * self.clock_ms
        closed = []
        while stamp > self.tick:
            closed.append(self.close_tick())
        return closed

    def close_tick(self) -> tuple[int, dict[str, float]]:
        """Ends the running tick now (the stream's last tick has no later event to end it)."""
        if self.tick is None:
            raise ValueError("no event has arrived yet: there is no tick to close")
        closed = (self.tick, {**_row(self.book), "ofi": self._ofi, "trade_flow": self._trade_flow, "events": self._events})
        self.tick, self._ofi, self._trade_flow, self._events = self.tick + self.clock_ms, 0.0, 0.0, 0
        return closed

    def add_order(self, order: int, action: str, direction: str, price: float, volume: float, stamp: int):
        closed = self._advance(stamp)
        if self._first_stamp is None:
            self._first_stamp = stamp
        if not self._snapshot_over and not (stamp == self._first_stamp and action == "created"):
            self._snapshot_over = True
            self.book.end_snapshot()
        before = _touch(self.book)
        self.book.apply(order, action, direction, price, volume, stamp)
        if self._snapshot_over:
            self._ofi += ofi_term(before, _touch(self.book))
        self._events += 1
        return closed

    def add_trade(self, side: str, amount: float, stamp: int):
        """A trade of ``amount`` on ``side`` (buy/sell): it counts in the trade flow of its tick."""
        closed = self._advance(stamp)
        self._trade_flow += amount if side == "buy" else -amount
        return closed


def features(orders: pd.DataFrame, trades: pd.DataFrame, clock_ms: int = CLOCK_MS) -> pd.DataFrame:
    """One row per tick from the first to the last event: mid, spread, microprice, depth imbalance
    ``(bid - ask) / (bid + ask)`` over the top 1/5/20 levels, ``ofi`` (the sum of the tick's per-event OFI terms,
    counted from the first event after the snapshot), ``trade_flow`` (buy minus sell volume traded in the tick)
    and ``events``. Indexed by tick time (UTC)."""
    clock = TickClock(clock_ms)
    rows = []
    for event in order_events(orders):
        rows += clock.add_order(*event)
    rows.append(clock.close_tick())
    ticks, values = zip(*rows)
    frame = pd.DataFrame(list(values), index=pd.to_datetime(list(ticks), unit="ms", utc=True).rename("tick"))
    # Trades outside the orders' ticks fall away, so the rows are the orders' ticks whatever the trades hold.
    signed = np.where(trades["side"].to_numpy() == "buy", 1.0, -1.0) * trades["amount"].to_numpy()
    trade_ticks = -(-trades["exchange_timestamp"].to_numpy() // clock_ms) * clock_ms
    flow = pd.Series(signed).groupby(pd.to_datetime(trade_ticks, unit="ms", utc=True)).sum()
    frame["trade_flow"] = flow.reindex(frame.index, fill_value=0.0)
    return frame
