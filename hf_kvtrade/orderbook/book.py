"""An L2 book of price levels replayed from L3 (per-order) events, exact to the events' own volumes."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class OrderBook:
    """Bid and ask levels (price -> total volume) and the live orders (id -> (side, price, volume)).

    A level's total is recomputed from its live orders and goes with its last order, so no float residue leaves an
    empty level behind; prices are kept sorted (the best bid last). From :meth:`end_snapshot` on, ``crossed_events``
    counts the events after which the best bid is at or above the best ask, ``crossed_episodes`` their runs and
    ``one_ms_episodes`` the runs that end within the exchange millisecond they began in (a marketable order shown
    resting before its fills). A crossing that outlives its millisecond against an order of the REST snapshot means
    that order was gone before the stream began (the exchange matches on arrival): it is removed and listed in
    ``stale_snapshot_orders``. Crossings between live orders are the feed's own and are only counted.
    """

    bids: dict[float, float] = field(default_factory=dict)
    asks: dict[float, float] = field(default_factory=dict)
    orders: dict[int, tuple[str, float, float]] = field(default_factory=dict)
    crossed_events: int = 0
    crossed_episodes: int = 0
    one_ms_episodes: int = 0
    stale_snapshot_orders: list[int] = field(default_factory=list)
    _level_orders: dict[tuple[str, float], set[int]] = field(default_factory=dict)
    _prices: dict[str, list[float]] = field(default_factory=lambda: {"bid": [], "ask": []})
    _live: bool = False
    _was_crossed: bool = False
    _snapshot_ids: set[int] = field(default_factory=set)
    _crossed_since: int | None = None
    _episode_start: int | None = None

    def _levels(self, side: str) -> dict[float, float]:
        return self.bids if side == "bid" else self.asks

    def _add(self, order: int, side: str, price: float, volume: float) -> None:
        members = self._level_orders.get((side, price))
        if members is None:  # a new level (no empty set allocated for the common case of an existing one)
            members = self._level_orders[(side, price)] = set()
            bisect.insort(self._prices[side], price)
        members.add(order)
        self.orders[order] = (side, price, volume)
        self._refresh(side, price)

    def _remove(self, order: int) -> None:
        side, price, _ = self.orders.pop(order)
        members = self._level_orders[(side, price)]
        members.discard(order)
        if not members:
            del self._level_orders[(side, price)]
            prices = self._prices[side]
            del prices[bisect.bisect_left(prices, price)]
        self._refresh(side, price)

    def _refresh(self, side: str, price: float) -> None:
        members = self._level_orders.get((side, price))
        if members:
            self._levels(side)[price] = sum(self.orders[order][2] for order in members)
        else:
            self._levels(side).pop(price, None)

    def apply(self, order: int, action: str, direction: str, price: float, volume: float, stamp: int | None = None) -> None:
        """One event at exchange time ``stamp`` (ms). An unknown id of a delete is ignored (the reader lists those
        lines); any other inconsistency raises. Without ``stamp`` no snapshot order is ever judged stale."""
        if action == "created":
            if order in self.orders:
                raise ValueError(f"created id {order}, which is already live")
            self._add(order, direction, price, volume)
        elif action == "changed":
            self._remove(order)
            self._add(order, direction, price, volume)
        elif action == "deleted":
            if order in self.orders:
                self._remove(order)
        else:
            raise ValueError(f"unknown action {action!r}")
        if self._live:
            self._drop_stale_snapshot_orders(stamp)
            crossed = self.crossed
            self.crossed_events += crossed
            if crossed != self._was_crossed:  # an episode starts or ends
                self._was_crossed = crossed
                if crossed:
                    self.crossed_episodes += 1
                    self._episode_start = stamp
                else:
                    self.one_ms_episodes += stamp == self._episode_start

    def end_snapshot(self) -> None:
        """Marks the end of the snapshot rows: crossed moments count from here on."""
        self._live = True
        self._snapshot_ids = set(self.orders)

    def _drop_stale_snapshot_orders(self, stamp: int | None) -> None:
        if not self.crossed:
            self._crossed_since = None
            return
        if self._crossed_since is None:
            self._crossed_since = stamp
        if stamp is None or self._crossed_since is None or stamp <= self._crossed_since:
            return
        while self.crossed:
            touching = self._level_orders[("bid", self.best_bid)] | self._level_orders[("ask", self.best_ask)]
            stale = sorted(touching & self._snapshot_ids)
            if not stale:
                break
            for order in stale:
                self._remove(order)
                self._snapshot_ids.discard(order)
                self.stale_snapshot_orders.append(order)
        if not self.crossed:
            self._crossed_since = None

    @property
    def best_bid(self) -> float | None:
        return self._prices["bid"][-1] if self._prices["bid"] else None

    @property
    def best_ask(self) -> float | None:
        return self._prices["ask"][0] if self._prices["ask"] else None

    @property
    def crossed(self) -> bool:
        bid, ask = self.best_bid, self.best_ask
        return bid is not None and ask is not None and bid >= ask

    def depth(self, side: str, levels: int) -> list[tuple[float, float]]:
        """The best ``levels`` (price, volume) pairs of ``side``, best first."""
        prices = self._prices[side]
        chosen = prices[: -levels - 1 : -1] if side == "bid" else prices[:levels]
        return [(price, self._levels(side)[price]) for price in chosen]
