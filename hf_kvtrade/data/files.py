"""User OHLCV data from CSV or Parquet files, and the one validator every price frame goes through."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

PRICE_COLUMNS = ("open", "high", "low", "close")
OHLCV_COLUMNS = (*PRICE_COLUMNS, "volume")


def validate_ohlcv(
    frame: pd.DataFrame,
    repair: bool = False,
    max_gap: str | pd.Timedelta | None = None,
) -> pd.DataFrame:
    """Checks a frame indexed by a tz-aware ``DatetimeIndex`` with at least a ``close`` column; returns it with a
    UTC index named ``timestamp`` and float columns.

    A bad frame raises a ``ValueError`` naming the first offending row, unless ``repair`` sorts the rows, keeps the
    last row of a duplicate timestamp (the latest correction of a bar) and drops rows whose ``close`` is missing or
    whose prices are not positive and finite. A gap longer than ``max_gap`` is never repaired: filling it would
    invent prices.
    """
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise ValueError(f"the index must be a DatetimeIndex of bar timestamps, got {type(frame.index).__name__}")
    if frame.index.tz is None:
        raise ValueError("timestamps are timezone-naive: localize them (e.g. index.tz_localize('UTC')) first")
    if "close" not in frame.columns:
        raise ValueError(f"missing column 'close'; columns are {list(frame.columns)}")
    frame = frame.astype("float64")
    frame.index = frame.index.tz_convert("UTC").rename("timestamp")

    steps = np.diff(frame.index.asi8)
    if np.any(steps < 0):
        if not repair:
            row = int(np.flatnonzero(steps < 0)[0]) + 1
            raise ValueError(f"timestamps are not sorted: row {row} ({frame.index[row]}) comes before the row above it")
        frame = frame.sort_index(kind="stable")
    duplicated = frame.index.duplicated(keep="last")
    if duplicated.any():
        if not repair:
            row = int(np.flatnonzero(frame.index.duplicated())[0])
            raise ValueError(f"duplicate timestamp {frame.index[row]} at row {row}")
        frame = frame[~duplicated]

    prices = frame[[column for column in PRICE_COLUMNS if column in frame.columns]]
    values = prices.to_numpy()
    # A missing open/high/low on a bar that has a close is harmless; the close is what gets tokenized.
    invalid = ~(np.isfinite(values) & (values > 0)) & (~np.isnan(values) | (prices.columns == "close"))
    bad_rows = invalid.any(axis=1)
    if bad_rows.any():
        if not repair:
            row = int(np.flatnonzero(bad_rows)[0])
            column = prices.columns[int(np.flatnonzero(invalid[row])[0])]
            raise ValueError(
                f"{column} at row {row} ({frame.index[row]}) is {prices.iloc[row][column]}: prices must be positive "
                f"and finite (pass repair=True to drop such rows)"
            )
        frame = frame[~bad_rows]
    if len(frame) < 2:
        raise ValueError(f"need at least 2 valid bars, got {len(frame)}")

    if max_gap is not None:
        max_gap = pd.Timedelta(max_gap)
        if (gaps := np.flatnonzero(np.diff(frame.index) > max_gap)).size:
            row = int(gaps[0])
            raise ValueError(
                f"gap of {frame.index[row + 1] - frame.index[row]} between {frame.index[row]} and "
                f"{frame.index[row + 1]} is longer than max_gap={max_gap}"
            )
    return frame


def read_ohlcv(
    path: str | os.PathLike,
    columns: dict[str, str] | None = None,
    timestamp_column: str = "timestamp",
    timezone: str = "UTC",
    repair: bool = False,
    max_gap: str | pd.Timedelta | None = None,
) -> pd.DataFrame:
    """Reads OHLCV bars from a ``.csv`` (optionally compressed) or ``.parquet`` file and validates them.

    Args:
        columns: maps the file's column names to ``timestamp``, ``open``, ``high``, ``low``, ``close``,
            ``volume``, e.g. ``{"Date": "timestamp", "Adj Close": "close"}``. Names are then matched
            case-insensitively, so ``Close`` needs no mapping.
        timestamp_column: the column (after mapping) holding bar times: datetimes, ISO strings with or without
            offsets, or integer epoch milliseconds.
        timezone: zone of timezone-naive timestamps; aware timestamps are converted to UTC.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif ".csv" in path.suffixes:
        frame = pd.read_csv(path)
    else:
        raise ValueError(f"{path} is neither a CSV (.csv, .csv.gz, ...) nor a Parquet (.parquet) file")

    if columns:
        unknown = sorted(set(columns) - set(frame.columns))
        if unknown:
            raise ValueError(f"column mapping names {unknown}, which {path.name} lacks; it has {list(frame.columns)}")
        frame = frame.rename(columns=columns)
    frame = frame.rename(columns=lambda name: str(name).lower())
    timestamp_column = timestamp_column.lower()
    if timestamp_column not in frame.columns:
        raise ValueError(
            f"missing timestamp column {timestamp_column!r} in {path.name}; columns are {list(frame.columns)} "
            f"(map yours with columns={{'Date': 'timestamp'}})"
        )
    if "close" not in frame.columns:
        raise ValueError(f"missing column(s) ['close'] in {path.name}; columns are {list(frame.columns)}")
    return to_ohlcv(frame, _parse_timestamps(frame.pop(timestamp_column)), timezone, repair=repair, max_gap=max_gap)


def to_ohlcv(frame: pd.DataFrame, timestamps, timezone: str = "UTC", **validation) -> pd.DataFrame:
    """``frame``'s OHLCV columns (names matched case-insensitively, others dropped) on ``timestamps``, through
    :func:`validate_ohlcv` with ``validation``. Naive timestamps are taken to be in ``timezone``."""
    frame = frame.rename(columns=lambda name: str(name).lower())
    stamps = pd.DatetimeIndex(timestamps)
    frame.index = stamps.tz_localize(timezone) if stamps.tz is None else stamps.tz_convert("UTC")
    frame = frame[[column for column in OHLCV_COLUMNS if column in frame.columns]]
    return validate_ohlcv(frame, **validation)


def _parse_timestamps(values: pd.Series) -> pd.DatetimeIndex:
    if pd.api.types.is_integer_dtype(values):
        return pd.DatetimeIndex(pd.to_datetime(values, unit="ms", utc=True))
    try:
        return pd.DatetimeIndex(pd.to_datetime(values, format="ISO8601"))
    except (ValueError, TypeError):
        # Strings with different UTC offsets (e.g. across a DST change) parse only straight into UTC.
        try:
            return pd.DatetimeIndex(pd.to_datetime(values, utc=True, format="mixed"))
        except (ValueError, TypeError) as error:
            raise ValueError(f"cannot parse timestamps: {error}") from None
