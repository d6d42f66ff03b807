"""The Bitstamp BTC/USD order-flow capture of ob-analytics 0.1.0 (docs/orderbook.md), read from the cached wheel.

The first rows are ``created`` events built from a REST snapshot of the book, the last ``deleted`` events for every
order still resting at the end. The wheel's data are GPL-2.0-or-later, so they are read in place, never copied.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from ..data.archives import OB_ANALYTICS
from .book import OrderBook
from .events import order_events, read_orders, read_trades
from .features import snapshot_rows

SAMPLE = "ob_analytics/_sample_data/"


def load_orders() -> pd.DataFrame:
    """The capture's 314,057 order events; raises DataNotFetchedError when the wheel is not in the cache."""
    return read_orders(OB_ANALYTICS.read_member(SAMPLE + "orders.csv.gz"), "orders.csv.gz", compressed=True,
                       orphan_deletes=True)  # fmt: skip


def load_trades() -> pd.DataFrame:
    return read_trades(OB_ANALYTICS.read_member(SAMPLE + "trades.csv"), "trades.csv")


def load_meta() -> dict:
    return json.loads(OB_ANALYTICS.read_member(SAMPLE + "meta.json"))


def _levels_match(book: OrderBook) -> bool:
    """Whether the levels are the live orders' volumes summed by side and price (to float summation order)."""
    live = pd.DataFrame(list(book.orders.values()), columns=["side", "price", "volume"])
    expected = live.groupby(["side", "price"])["volume"].sum()
    levels = sorted([(("ask", p), v) for p, v in book.asks.items()] + [(("bid", p), v) for p, v in book.bids.items()])
    return [key for key, _ in levels] == expected.index.tolist() and np.allclose(
        [volume for _, volume in levels], expected.to_numpy(dtype=float), rtol=1e-12, atol=0)


def reconstruct(orders: pd.DataFrame, trades: pd.DataFrame, audit_every: int = 50_000) -> dict:
    """Replays the events and measures what the checks need: counts of events, orders, snapshot rows, orphan
    deletes and stale snapshot orders; crossed events and episodes after the snapshot, and how many episodes end
    within the exchange millisecond they start in; each trade's best bid and ask just before the first event of its
    millisecond and whether its price lies at or inside them; whether the level totals equal the live orders' sums
    at every ``audit_every``-th event and at the end; the live orders left."""
    book = OrderBook()
    first_live = snapshot_rows(orders)
    trade_stamps = trades["exchange_timestamp"].to_numpy()
    touch = np.full((len(trades), 2), np.nan)
    next_trade, audits_ok = 0, True
    for row, (order, action, direction, price, volume, stamp) in enumerate(order_events(orders)):
        if row == first_live:
            book.end_snapshot()
        while next_trade < len(trades) and trade_stamps[next_trade] <= stamp:
            touch[next_trade] = (book.best_bid, book.best_ask)
            next_trade += 1
        book.apply(order, action, direction, price, volume, stamp)
        if row % audit_every == 0:
            audits_ok &= _levels_match(book)
    audits_ok &= _levels_match(book)
    prices = trades["price"].to_numpy()
    inside = (touch[:, 0] <= prices) & (prices <= touch[:, 1])
    return {
        "events": len(orders), "orders": int(orders["id"].nunique()), "snapshot_rows": first_live,
        "orphan_deletes": len(orders.attrs.get("orphan_delete_lines", [])),
        "stale_snapshot_orders": len(book.stale_snapshot_orders),
        "crossed_events": book.crossed_events, "crossed_episodes": book.crossed_episodes,
        "crossed_episodes_within_one_ms": book.one_ms_episodes,
        "trades": len(trades), "trades_inside": int(inside.sum()), "trades_outside": int((~inside).sum()),
        "trade_touch": touch, "totals_match": bool(audits_ok), "orders_left": len(book.orders),
    }  # fmt: skip
