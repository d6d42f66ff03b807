"""Strict readers of per-order (L3) event CSVs and trade CSVs in the layout of Bitstamp captures.

Orders: ``id,timestamp,exchange_timestamp,price,volume,action,direction`` with times in ms, ``action`` one of
created/changed/deleted and ``direction`` bid/ask. A ``changed`` row carries the order's new price and remaining
volume (Bitstamp reports the fill price and what is left), a ``deleted`` row the order's last state. Trades:
``trade_id,timestamp,exchange_timestamp,price,amount,buy_order_id,sell_order_id,side`` with ``side`` buy/sell.

Every bad row raises a ValueError naming the file, its line (1-based, the header is line 1) and what is wrong:
an unknown action, direction or side, a price or volume that is negative or not a finite number, a change or
delete of an id that is not live, a create of an id already live, or an ``exchange_timestamp`` that goes back.
Rows are never dropped.

The event clock is ``exchange_timestamp``: the receive ``timestamp`` of a capture steps back once, where the
snapshot rows (stamped when the REST reply arrived) give way to the live messages that arrived before it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

ORDER_COLUMNS = ("id", "timestamp", "exchange_timestamp", "price", "volume", "action", "direction")
TRADE_COLUMNS = ("trade_id", "timestamp", "exchange_timestamp", "price", "amount", "buy_order_id", "sell_order_id", "side")
ACTIONS = ("created", "changed", "deleted")
DIRECTIONS = ("bid", "ask")
SIDES = ("buy", "sell")


def _fail(name: str, line: int, message: str) -> NoReturn:
    raise ValueError(f"{name} line {line}: {message}")


def _read_text_columns(source: str | Path | bytes, name: str, columns: tuple[str, ...], compressed: bool) -> pd.DataFrame:
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    frame = pd.read_csv(handle, dtype=str, keep_default_na=False, compression="gzip" if compressed else "infer")
    header = tuple(frame.columns)
    if header != columns:
        _fail(name, 1, f"header is {','.join(header)}, expected {','.join(columns)}")
    return frame


def _numbers(frame: pd.DataFrame, name: str, column: str, integer: bool) -> np.ndarray:
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        row = int(bad[0])
        what = "empty" if not raw.iloc[row].strip() else f"{raw.iloc[row]!r}"
        _fail(name, row + 2, f"{column} is {what}: it must be a finite number >= 0")
    if not integer:
        return values
    fractional = np.flatnonzero(values != np.floor(values))
    if fractional.size:
        _fail(name, int(fractional[0]) + 2, f"{column} is {raw.iloc[fractional[0]]!r}: it must be an integer")
    return pd.to_numeric(raw).to_numpy().astype(np.int64)  # parsed again: ids above 2**53 lose digits as floats


def _choice(frame: pd.DataFrame, name: str, column: str, allowed: tuple[str, ...]) -> np.ndarray:
    values = frame[column].to_numpy(dtype=object)
    bad = np.flatnonzero(~np.isin(values, allowed))
    if bad.size:
        _fail(name, int(bad[0]) + 2, f"{column} is {values[bad[0]]!r}, expected one of {', '.join(allowed)}")
    return values


def _check_clock(name: str, stamps: np.ndarray) -> None:
    back = np.flatnonzero(np.diff(stamps) < 0)
    if back.size:
        row = int(back[0]) + 1
        _fail(name, row + 2, f"exchange_timestamp {stamps[row]} goes back from {stamps[row - 1]} on line {row + 1}")


def read_orders(source: str | Path | bytes, name: str | None = None, compressed: bool = False,
                orphan_deletes: bool = False) -> pd.DataFrame:  # fmt: skip
    """Order events as a frame with the CSV's columns (``line`` added), every row checked.

    Args:
        source: a path, or the file's bytes (then ``name`` names it in errors).
        compressed: the bytes are gzip-compressed (a path ending in ``.gz`` is recognised by itself).
        orphan_deletes: accept a ``deleted`` of an id never seen, listing its line in
            ``frame.attrs["orphan_delete_lines"]``. A capture needs it for orders created after its REST snapshot
            was taken but before its live stream began: no row ever showed them.
    """
    name = name or Path(source).name
    frame = _read_text_columns(source, name, ORDER_COLUMNS, compressed)
    ids = _numbers(frame, name, "id", integer=True)
    stamps = _numbers(frame, name, "exchange_timestamp", integer=True)
    out = pd.DataFrame({
        "id": ids,
        "timestamp": _numbers(frame, name, "timestamp", integer=True),
        "exchange_timestamp": stamps,
        "price": _numbers(frame, name, "price", integer=False),
        "volume": _numbers(frame, name, "volume", integer=False),
        "action": _choice(frame, name, "action", ACTIONS),
        "direction": _choice(frame, name, "direction", DIRECTIONS),
    })  # fmt: skip
    _check_clock(name, stamps)
    live: dict[int, int] = {}  # id -> line it was created on
    orphans = []
    for row, (order, action) in enumerate(zip(ids.tolist(), out["action"].tolist())):
        line = row + 2
        if action == "created":
            if order in live:
                _fail(name, line, f"created id {order}, which is already live (created on line {live[order]})")
            live[order] = line
        elif order not in live:
            if action == "deleted" and orphan_deletes:
                orphans.append(line)
                continue
            _fail(name, line, f"{action} id {order}, which is not live (never created, or already deleted)")
        elif action == "deleted":
            del live[order]
    out.insert(0, "line", np.arange(2, len(out) + 2))
    out.attrs["orphan_delete_lines"] = orphans
    return out


def read_trades(source: str | Path | bytes, name: str | None = None) -> pd.DataFrame:
    """Trades as a frame with the CSV's columns (``line`` added); ``price`` and ``amount`` must be positive."""
    name = name or Path(source).name
    frame = _read_text_columns(source, name, TRADE_COLUMNS, compressed=False)
    out = pd.DataFrame({column: _numbers(frame, name, column, integer=column not in ("price", "amount"))
                        for column in TRADE_COLUMNS[:-1]})  # fmt: skip
    for column in ("price", "amount"):
        zero = np.flatnonzero(out[column].to_numpy() == 0)
        if zero.size:
            _fail(name, int(zero[0]) + 2, f"{column} is 0: a trade has a positive {column}")
    out["side"] = _choice(frame, name, "side", SIDES)
    _check_clock(name, out["exchange_timestamp"].to_numpy())
    out.insert(0, "line", np.arange(2, len(out) + 2))
    return out
