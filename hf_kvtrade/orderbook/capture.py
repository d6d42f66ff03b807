"""The Bitstamp BTC/USD order-flow capture of ob-analytics 0.1.0, read from the cached wheel, and its checks.

A real 30-minute recording (2026-05-02 02:36:20-03:06:20 UTC) of Bitstamp's ``live_orders`` and ``live_trades``:
the first rows are ``created`` events built from a REST snapshot of the book, the last are ``deleted`` events for
every order still resting at the end. The wheel is fetched by ``python -m hf_kvtrade.data.fetch`` and read in
place (its data are GPL-2.0-or-later, so no copy enters this repository).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from ..data.archives import OB_ANALYTICS
from .book import OrderBook
from .events import read_orders, read_trades
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


def _levels_from_orders(orders: dict[int, tuple[str, float, float]], side: str) -> dict[float, float]:
    frame = pd.DataFrame([(price, volume) for s, price, volume in orders.values() if s == side], columns=["p", "v"])
    return frame.groupby("p")["v"].sum().to_dict() if len(frame) else {}


def _levels_match(book: OrderBook) -> bool:
    return all(book._levels(side).keys() == (expected := _levels_from_orders(book.orders, side)).keys()
               and np.allclose([book._levels(side)[p] for p in expected], list(expected.values()), rtol=1e-12, atol=0)
               for side in ("bid", "ask"))  # fmt: skip


def reconstruct(orders: pd.DataFrame, trades: pd.DataFrame, audit_every: int = 50_000) -> dict:
    """Replays the events and measures what the checks need.

    Returns the counts of events, distinct orders, snapshot rows and orphan deletes; ``crossed_events`` and
    ``crossed_episodes`` after the snapshot, and how many episodes end within the exchange millisecond they start
    in (a marketable order shown resting before its fills); for each trade the best bid and ask just before the
    first event of its exchange millisecond and whether its price lies at or inside them (tolerance zero);
    whether the level totals equal the sum of live orders (to float summation order) at every ``audit_every``-th event; the live orders left
    at the end.
    """
    book = OrderBook()
    first_live = snapshot_rows(orders)
    trade_stamps = trades["exchange_timestamp"].to_numpy()
    touch = np.full((len(trades), 2), np.nan)
    next_trade, audits_ok, episode_start, same_ms_episodes = 0, True, None, 0
    columns = zip(orders["id"].tolist(), orders["action"].tolist(), orders["direction"].tolist(),
                  orders["price"].tolist(), orders["volume"].tolist(), orders["exchange_timestamp"].tolist())  # fmt: skip
    for row, (order, action, direction, price, volume, stamp) in enumerate(columns):
        if row == first_live:
            book.end_snapshot()
        while next_trade < len(trades) and trade_stamps[next_trade] <= stamp:
            touch[next_trade] = (book.best_bid, book.best_ask)
            next_trade += 1
        was_crossed = book.crossed and row > first_live
        book.apply(order, action, direction, price, volume, stamp)
        if row >= first_live and book.crossed and not was_crossed:
            episode_start = stamp
        if row >= first_live and was_crossed and not book.crossed:
            same_ms_episodes += stamp == episode_start
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
        "crossed_episodes_within_one_ms": same_ms_episodes,
        "trades": len(trades), "trades_inside": int(inside.sum()), "trades_outside": int((~inside).sum()),
        "trade_touch": touch, "totals_match": bool(audits_ok), "orders_left": len(book.orders),
    }  # fmt: skip
