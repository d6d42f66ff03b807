"""Strict readers of per-order (L3) event CSVs and trade CSVs in the layout of Bitstamp captures (times in ms).

A ``changed`` row carries the order's new price and remaining volume (Bitstamp reports the fill price and what is
left), a ``deleted`` row the order's last state. Every bad row raises a ValueError naming the file and its line
(1-based, the header is line 1); rows are never dropped.

The event clock is ``exchange_timestamp``: the receive ``timestamp`` of a capture steps back once, where the
snapshot rows (stamped when the REST reply arrived) give way to the live messages that arrived before it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

ORDER_COLUMNS = ("id", "timestamp", "exchange_timestamp", "price", "volume", "action", "direction")
TRADE_COLUMNS = ("trade_id", "timestamp", "exchange_timestamp", "price", "amount", "buy_order_id", "sell_order_id", "side")
ACTIONS = ("created", "changed", "deleted")
DIRECTIONS = ("bid", "ask")
SIDES = ("buy", "sell")
EVENT_FIELDS = ["id", "action", "direction", "price", "volume", "exchange_timestamp"]


def _check(name: str, bad, message: Callable[[int], str]) -> None:
    """Raises at the first row where ``bad`` holds, with ``message(row)``."""
    rows = np.flatnonzero(bad)
    if rows.size:
        raise ValueError(f"{name} line {rows[0] + 2}: {message(int(rows[0]))}")


def _numbers(frame: pd.DataFrame, name: str, column: str, integer: bool) -> np.ndarray:
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    _check(name, ~np.isfinite(values) | (values < 0), lambda row: f"{column} is "
           f"{repr(raw.iloc[row]) if raw.iloc[row].strip() else 'empty'}: it must be a finite number >= 0")
    if not integer:
        return values
    _check(name, values != np.floor(values), lambda row: f"{column} is {raw.iloc[row]!r}: it must be an integer")
    return pd.to_numeric(raw).to_numpy().astype(np.int64)  # parsed again: ids above 2**53 lose digits as floats


def _check_lifecycles(name: str, ids: np.ndarray, action: pd.Series, orphan_deletes: bool) -> list[int]:
    """Lines of the orphan deletes; raises at a create of a live id or a change or delete of one not live."""
    previous = action.groupby(ids).shift()
    live = (previous.notna() & (previous != "deleted")).to_numpy()
    created = (action == "created").to_numpy()
    orphan = (action == "deleted").to_numpy() & ~live & orphan_deletes

    def message(row: int) -> str:
        if created[row]:
            line = np.flatnonzero(created[:row] & (ids[:row] == ids[row]))[-1] + 2
            return f"created id {ids[row]}, which is already live (created on line {line})"
        return f"{action.iloc[row]} id {ids[row]}, which is not live (never created, or already deleted)"

    _check(name, (created == live) & ~orphan, message)  # a create needs an id not live, the others a live one
    return (np.flatnonzero(orphan) + 2).tolist()


def _read(source: str | Path | bytes, name: str, columns: tuple[str, ...], choices: dict[str, tuple[str, ...]],
          floats: tuple[str, str], compressed: bool = False, positive: bool = False) -> pd.DataFrame:
    """The CSV's columns checked: ``choices`` among their allowed values, the others numbers >= 0 (integers unless
    in ``floats``, and the ``floats`` above zero if ``positive``); a ``line`` column added."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    frame = pd.read_csv(handle, dtype=str, keep_default_na=False, compression="gzip" if compressed else "infer")
    if tuple(frame.columns) != columns:
        raise ValueError(f"{name} line 1: header is {','.join(frame.columns)}, expected {','.join(columns)}")
    out = pd.DataFrame({column: _numbers(frame, name, column, integer=column not in floats)
                        for column in columns if column not in choices})
    for column in floats if positive else ():
        _check(name, out[column].to_numpy() == 0, lambda row: f"{column} is 0: a trade has a positive {column}")
    for column, allowed in choices.items():
        values = out[column] = frame[column].to_numpy(dtype=object)
        _check(name, ~np.isin(values, allowed),
               lambda row: f"{column} is {values[row]!r}, expected one of {', '.join(allowed)}")
    stamps = out["exchange_timestamp"].to_numpy()
    _check(name, np.diff(stamps, prepend=stamps[:1]) < 0,
           lambda row: f"exchange_timestamp {stamps[row]} goes back from {stamps[row - 1]} on line {row + 1}")
    out.insert(0, "line", np.arange(2, len(out) + 2))
    return out


def read_orders(source: str | Path | bytes, name: str | None = None, compressed: bool = False,
                orphan_deletes: bool = False) -> pd.DataFrame:  # fmt: skip
    """Order events as a frame with the CSV's columns (``line`` added), every row checked.

    ``source`` is a path or the file's bytes (then ``name`` names it in errors; ``compressed`` if gzipped).
    ``orphan_deletes`` accepts a ``deleted`` of an id never seen, listing its line in
    ``frame.attrs["orphan_delete_lines"]``: a capture needs it for orders created after its REST snapshot was taken
    but before its live stream began, which no row ever showed.
    """
    name = name or Path(source).name
    choices = {"action": ACTIONS, "direction": DIRECTIONS}
    out = _read(source, name, ORDER_COLUMNS, choices, ("price", "volume"), compressed)
    out.attrs["orphan_delete_lines"] = _check_lifecycles(name, out["id"].to_numpy(), out["action"], orphan_deletes)
    return out


def read_trades(source: str | Path | bytes, name: str | None = None) -> pd.DataFrame:
    """Trades as a frame with the CSV's columns (``line`` added); ``price`` and ``amount`` must be positive."""
    return _read(source, name or Path(source).name, TRADE_COLUMNS, {"side": SIDES}, ("price", "amount"), positive=True)


def order_events(orders: pd.DataFrame):
    """``(id, action, direction, price, volume, exchange_timestamp)`` of each row, the arguments of
    ``OrderBook.apply`` and ``TickClock.add_order``."""
    return zip(*(orders[column].tolist() for column in EVENT_FIELDS))  # tolist: Python scalars, fast
