"""An L2 book of price levels replayed from L3 (per-order) events, exact to the events' own volumes."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class OrderBook:
    """Bid and ask levels (price -> total volume) and the live orders (id -> (side, price, volume)).

    Level totals are sums of the live orders' volumes, kept exactly in step with them: a level is removed when
    its last order goes, so no residue of float subtraction leaves an empty level behind. Prices are kept sorted
    (bids ascending too; the best bid is the last), so the top levels are a slice, not a sort per query.

    ``crossed_events`` counts the events after which the best bid is at or above the best ask and
    ``crossed_episodes`` the runs of such events; both count only after :meth:`end_snapshot`, since a REST
    snapshot is one instant and never crossed.

    Stale snapshot orders: the exchange matches an order on arrival, so a crossing that outlives the exchange
    millisecond it began in cannot be real when one side of it is an order from the REST snapshot. That order was
    filled or cancelled in the gap between the snapshot and the start of the stream, and its delete never reached
    the feed. Such orders are removed at that moment and listed in ``stale_snapshot_orders`` (they are not hidden:
    a capture's report gives their count). Crossings between live orders are the feed's own and are only counted.
    """

    bids: dict[float, float] = field(default_factory=dict)
    asks: dict[float, float] = field(default_factory=dict)
    orders: dict[int, tuple[str, float, float]] = field(default_factory=dict)
    crossed_events: int = 0
    crossed_episodes: int = 0
    _level_orders: dict[tuple[str, float], set[int]] = field(default_factory=dict)
    _prices: dict[str, list[float]] = field(default_factory=lambda: {"bid": [], "ask": []})
    stale_snapshot_orders: list[int] = field(default_factory=list)
    _live: bool = False
    _was_crossed: bool = False
    _snapshot_ids: set[int] = field(default_factory=set)
    _crossed_since: int | None = None

    def _levels(self, side: str) -> dict[float, float]:
        return self.bids if side == "bid" else self.asks

    def _add(self, order: int, side: str, price: float, volume: float) -> None:
        key = (side, price)
        members = self._level_orders.get(key)
        if members is None:
            self._level_orders[key] = {order}
            bisect.insort(self._prices[side], price)
        else:
            members.add(order)
        self.orders[order] = (side, price, volume)
        self._refresh(side, price)

    def _remove(self, order: int) -> tuple[str, float, float]:
        side, price, volume = self.orders.pop(order)
        key = (side, price)
        members = self._level_orders[key]
        members.discard(order)
        if not members:
            del self._level_orders[key]
            prices = self._prices[side]
            del prices[bisect.bisect_left(prices, price)]
        self._refresh(side, price)
        return side, price, volume

    def _refresh(self, side: str, price: float) -> None:
        members = self._level_orders.get((side, price))
        levels = self._levels(side)
        if members:
            levels[price] = sum(self.orders[order][2] for order in members)
        else:
            levels.pop(price, None)

    def apply(self, order: int, action: str, direction: str, price: float, volume: float, stamp: int | None = None) -> None:
        """One event at exchange time ``stamp`` (ms). An unknown id of a delete is ignored (the reader lists those
        lines); any other inconsistency raises, since the readers already refused such rows. Without ``stamp`` no
        snapshot order is ever judged stale."""
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
            self.crossed_episodes += crossed and not self._was_crossed
            self._was_crossed = crossed

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
        book = self._levels(side)
        return [(price, book[price]) for price in chosen]

    def total_volume(self, side: str) -> float:
        return sum(self._levels(side).values())
