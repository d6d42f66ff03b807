"""Live market data for users with internet: Bybit v5 klines over plain HTTP, and Yahoo Finance via yfinance.

Both return the same validated frame as every other loader (UTC ``DatetimeIndex``, float OHLCV columns).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from .files import PRICE_COLUMNS, to_ohlcv, validate_ohlcv

BYBIT_URL = "https://api.bybit.com"
BYBIT_INTERVALS = ("1", "3", "5", "15", "30", "60", "120", "240", "360", "720", "D", "W", "M")
BYBIT_RATE_LIMIT_CODE = 10006
BYBIT_MAX_LIMIT = 1000


class BybitError(RuntimeError):
    """Bybit answered with an error (``retCode`` != 0 or an HTTP error) that retrying does not fix."""


class BybitRateLimitError(BybitError):
    """Bybit kept rate-limiting the requests (HTTP 429 or ``retCode`` 10006) after every retry."""


@dataclass
class BybitClient:
    """Fetches klines from ``GET /v5/market/kline``, paging backwards through time (at most 1000 bars a request).
    Rate limits and server errors are retried with exponential backoff, other API errors raise at once (docs/data.md).
    """

    base_url: str = BYBIT_URL
    max_retries: int = 4
    backoff: float = 0.5
    timeout: float = 10.0
    session: Any = None  # a requests.Session by default
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self):
        import requests

        self.base_url = self.base_url.rstrip("/")
        self.session = self.session or requests.Session()

    def klines(
        self,
        symbol: str,
        interval: str = "60",
        start: str | pd.Timestamp | None = None,
        end: str | pd.Timestamp | None = None,
        category: str = "linear",
        limit: int = BYBIT_MAX_LIMIT,
    ) -> pd.DataFrame:
        """Bars of ``symbol`` from ``start`` to ``end`` (UTC if naive; default: the latest ``limit`` bars)."""
        if interval not in BYBIT_INTERVALS:
            raise ValueError(f"interval must be one of {BYBIT_INTERVALS}, got {interval!r}")
        if not 1 <= limit <= BYBIT_MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {BYBIT_MAX_LIMIT}, got {limit}")
        start_ms, end_ms = _epoch_ms(start), _epoch_ms(end)
        rows: list[list[str]] = []
        while True:
            params = {"category": category, "symbol": symbol, "interval": interval, "limit": limit,
                      "start": start_ms, "end": end_ms}  # fmt: skip
            page = self._get("/v5/market/kline", {key: value for key, value in params.items() if value is not None})
            rows.extend(page["list"])
            if start_ms is None or len(page["list"]) < limit:
                break
            end_ms = min(int(row[0]) for row in page["list"]) - 1
            if end_ms < start_ms:
                break
        if not rows:
            raise ValueError(f"Bybit returned no {interval} klines for {category} {symbol} in the requested range")
        frame = pd.DataFrame([row[:6] for row in rows], columns=["timestamp", *PRICE_COLUMNS, "volume"])
        frame = frame.astype("float64")
        frame.index = pd.to_datetime(frame.pop("timestamp").astype("int64"), unit="ms", utc=True)
        # Consecutive pages share no bar, but a bar that closed between two requests can appear in both.
        return validate_ohlcv(frame.sort_index(), repair=True)

    def _get(self, path: str, params: dict) -> dict:
        import requests

        for attempt in range(self.max_retries + 1):
            delay = self.backoff * 2**attempt
            try:
                response = self.session.get(self.base_url + path, params=params, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as error:
                retryable = BybitError(f"Bybit unreachable after {attempt + 1} attempts: {error}")
            else:
                status = response.status_code
                if status == 429 or status >= 500:
                    error_class = BybitRateLimitError if status == 429 else BybitError
                    retryable = error_class(
                        f"Bybit answered HTTP {status} to {attempt + 1} attempts at {path} {params}"
                    )
                    delay = float(response.headers.get("Retry-After", delay))
                elif status != 200:
                    raise BybitError(f"Bybit answered HTTP {status} at {path}: {response.text[:200]}")
                else:
                    body = response.json()
                    code = body.get("retCode")
                    if code == 0:
                        return body["result"]
                    if code != BYBIT_RATE_LIMIT_CODE:
                        raise BybitError(f"Bybit error retCode {code}: {body.get('retMsg')} (request {path} {params})")
                    retryable = BybitRateLimitError(
                        f"Bybit rate limit (retCode {code}: {body.get('retMsg')}) persisted over {attempt + 1} attempts"
                    )
            if attempt == self.max_retries:
                raise retryable
            self.sleep(delay)


def _epoch_ms(stamp) -> int | None:
    return None if stamp is None else int(pd.Timestamp(stamp).timestamp() * 1000)  # naive stamps count as UTC


def fetch_yfinance(ticker: str, start=None, end=None, interval: str = "1d", **history_kwargs) -> pd.DataFrame:
    """Bars of ``ticker`` from Yahoo Finance through ``yfinance`` (the ``live`` extra), split- and dividend-adjusted."""
    try:
        import yfinance
    except ImportError:
        raise ImportError("fetch_yfinance needs yfinance: pip install 'hf-kvtrade[live]'") from None
    history = yfinance.Ticker(ticker).history(
        start=start, end=end, interval=interval, auto_adjust=True, **history_kwargs
    )
    if history.empty:
        raise ValueError(f"Yahoo Finance returned no {interval} bars for {ticker!r} between {start} and {end}")
    return from_yfinance_history(history)


def from_yfinance_history(history: pd.DataFrame) -> pd.DataFrame:
    """Converts a ``yfinance`` history frame (exchange-local index, capitalised columns) to the common format."""
    return to_ohlcv(history, history.index, repair=True)
