import numpy as np
import pandas as pd
import pytest

from hf_kvtrade.data.archives import DataNotFetchedError
from hf_kvtrade.orderbook import OrderBook, features, ofi_term, read_orders, read_trades

HEADER = "id,timestamp,exchange_timestamp,price,volume,action,direction\n"
ORDERS = (HEADER
          + "1,1000,1000,100.0,2.0,created,bid\n"
          + "2,1000,1000,101.0,1.0,created,ask\n"
          + "3,1050,1050,100.0,1.0,created,bid\n"
          + "2,1120,1120,101.0,0.5,changed,ask\n"
          + "4,1180,1180,102.0,3.0,created,ask\n"
          + "1,1250,1250,100.0,2.0,deleted,bid\n")  # fmt: skip
TRADES = ("trade_id,timestamp,exchange_timestamp,price,amount,buy_order_id,sell_order_id,side\n"
          "9,1120,1120,101.0,0.5,5,2,buy\n")  # fmt: skip


def _write(tmp_path, text, name="orders.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("3,1050,1050,100.0,1.0,created,bid", "3,1050,1050,100.0,1.0,amended,bid", "line 4: action is 'amended'"),
        ("3,1050,1050,100.0,1.0,created,bid", "3,1050,1050,100.0,-1.0,created,bid", "line 4: volume is '-1.0'"),
        ("3,1050,1050,100.0,1.0,created,bid", "3,1050,1050,inf,1.0,created,bid", "line 4: price is 'inf'"),
        ("3,1050,1050,100.0,1.0,created,bid", "3,1050,1050,100.0,nan,created,bid", "line 4: volume is 'nan'"),
        ("3,1050,1050,100.0,1.0,created,bid", "3,1050,1050,100.0,1.0,created,buy", "line 4: direction is 'buy'"),
        ("2,1120,1120,101.0,0.5,changed,ask", "7,1120,1120,101.0,0.5,changed,ask", "line 5: changed id 7, which is not live"),
        ("1,1250,1250,100.0,2.0,deleted,bid", "8,1250,1250,100.0,2.0,deleted,bid", "line 7: deleted id 8, which is not live"),
        ("4,1180,1180,102.0,3.0,created,ask", "4,1180,1010,102.0,3.0,created,ask", "line 6: exchange_timestamp 1010 goes back"),
        ("4,1180,1180,102.0,3.0,created,ask", "1,1180,1180,102.0,3.0,created,ask", "line 6: created id 1, which is already live"),
    ],
)  # fmt: skip
def test_malformed_order_rows_name_their_line(tmp_path, old, new, message):
    assert ORDERS.count(old) == 1
    with pytest.raises(ValueError, match=f"orders.csv {message}"):
        read_orders(_write(tmp_path, ORDERS.replace(old, new)))


def test_orphan_deletes_are_listed_not_dropped(tmp_path):
    text = ORDERS.replace("1,1250,1250,100.0,2.0,deleted,bid", "8,1250,1250,100.0,2.0,deleted,bid")
    orders = read_orders(_write(tmp_path, text), orphan_deletes=True)
    assert len(orders) == 6 and orders.attrs["orphan_delete_lines"] == [7]


def test_malformed_trade_rows_name_their_line(tmp_path):
    with pytest.raises(ValueError, match="trades.csv line 2: side is 'up'"):
        read_trades(_write(tmp_path, TRADES.replace(",buy\n", ",up\n"), "trades.csv"))
    with pytest.raises(ValueError, match="trades.csv line 2: amount is 0"):
        read_trades(_write(tmp_path, TRADES.replace(",0.5,", ",0,"), "trades.csv"))


def test_book_levels_and_crossing_are_exact(tmp_path):
    book = OrderBook()
    for row in read_orders(_write(tmp_path, ORDERS)).itertuples():
        book.apply(row.id, row.action, row.direction, row.price, row.volume)
    assert book.bids == {100.0: 1.0} and book.asks == {101.0: 0.5, 102.0: 3.0}
    assert book.depth("ask", 5) == [(101.0, 0.5), (102.0, 3.0)] and book.best_bid == 100.0
    book.end_snapshot()
    book.apply(5, "created", "bid", 101.0, 0.5)  # a marketable bid shown resting before its fill
    book.apply(5, "deleted", "bid", 101.0, 0.0)
    assert (book.crossed_events, book.crossed_episodes, book.crossed) == (1, 1, False)


def test_a_snapshot_order_crossed_past_a_millisecond_is_stale_and_listed(tmp_path):
    book = OrderBook()
    for row in read_orders(_write(tmp_path, ORDERS)).itertuples():
        book.apply(row.id, row.action, row.direction, row.price, row.volume, row.exchange_timestamp)
    book.end_snapshot()
    book.apply(7, "created", "bid", 101.5, 0.2, stamp=10_000)  # crosses the snapshot's ask at 101
    book.apply(8, "created", "ask", 103.0, 1.0, stamp=10_000)  # same millisecond: the fill may still come
    assert book.crossed and book.stale_snapshot_orders == []
    book.apply(9, "created", "ask", 104.0, 1.0, stamp=10_001)  # a millisecond later the snapshot ask is stale
    assert not book.crossed and book.best_ask == 102.0
    assert len(book.stale_snapshot_orders) == 1 and 101.0 not in book.asks
    # Live orders crossing each other past a millisecond are the feed's: counted, never removed.
    book.apply(4, "deleted", "ask", 102.0, 3.0, stamp=10_002)
    book.apply(10, "created", "bid", 104.5, 0.1, stamp=10_002)  # crosses the live ask at 104
    book.apply(11, "created", "bid", 99.0, 0.1, stamp=10_003)
    assert book.crossed and {9, 10} <= set(book.orders) and len(book.stale_snapshot_orders) == 1


def test_ofi_and_imbalance_on_a_hand_made_sequence(tmp_path):
    # Bid size grows at the same bid: +size added; ask size shrinks at the same ask: +size removed.
    assert ofi_term((100, 2, 101, 1), (100, 3, 101, 1)) == 1
    assert ofi_term((100, 2, 101, 1), (100, 2, 101, 0.5)) == 0.5
    assert ofi_term((100, 2, 101, 1), (99, 4, 101, 1)) == -2  # the bid drops a level: its old size leaves
    assert ofi_term((100, 2, 101, 1), (100, 2, 100.5, 3)) == -3  # a better ask arrives
    frame = features(read_orders(_write(tmp_path, ORDERS)), read_trades(_write(tmp_path, TRADES, "trades.csv")))
    at = {t.value // 10**6: row for t, row in frame.iterrows()}
    assert list(at) == [1000, 1100, 1200, 1300]
    # The snapshot is the two rows at 1000 ms; afterwards bid 100 x 3, ask 101 x 1.
    assert at[1100]["ofi"] == 1.0 and at[1100]["imbalance_1"] == pytest.approx((3 - 1) / 4)
    assert at[1200]["ofi"] == 0.5 and at[1200]["trade_flow"] == 0.5  # ask 1 -> 0.5; the 102 ask is not the touch
    assert at[1200]["imbalance_5"] == pytest.approx((3 - 3.5) / 6.5)
    assert at[1200]["microprice"] == pytest.approx((100 * 0.5 + 101 * 3) / 3.5) and at[1200]["spread"] == 1.0
    assert at[1300]["ofi"] == -2.0 and at[1300]["mid"] == 100.5  # order 1 (2.0 at the best bid) leaves


@pytest.fixture(scope="module")
def capture():
    from hf_kvtrade.orderbook import capture as module

    try:
        return module.load_orders(), module.load_trades(), module.load_meta()
    except DataNotFetchedError as error:
        pytest.skip(f"ob-analytics 0.1.0 wheel not fetched ({error})")


def test_real_capture_reconstructs(capture):
    from hf_kvtrade.orderbook.capture import reconstruct

    orders, trades, meta = capture
    result = reconstruct(orders, trades)
    assert result["events"] == meta["total_order_rows"] == 314_057
    assert result["snapshot_rows"] == meta["synthetic_created"] == 6512
    assert result["orphan_deletes"] == 13  # orders born between the REST snapshot and the first live message
    assert result["totals_match"] and result["orders_left"] == 0  # the synthetic deletes empty the book
    # Two snapshot orders were gone before the stream began: they stayed crossed past a millisecond.
    assert result["stale_snapshot_orders"] == 2
    # Every other crossing is the feed's own: a marketable order shown for the millisecond before its fill.
    assert result["crossed_episodes"] - result["crossed_episodes_within_one_ms"] == result["stale_snapshot_orders"]
    assert (result["crossed_events"], result["crossed_episodes"]) == (100_886, 100_709)
    assert (result["trades"], result["trades_inside"], result["trades_outside"]) == (284, 207, 77)


def test_real_capture_features_are_causal(capture):
    orders, trades, _ = capture
    cut = orders["exchange_timestamp"].iloc[40_000]
    head = orders[orders["exchange_timestamp"] <= cut].iloc[:60_000]
    full = features(orders.iloc[:60_000], trades)
    part = features(head, trades[trades["exchange_timestamp"] <= cut])
    shared = part.index[part.index <= pd.Timestamp(int(cut), unit="ms", tz="UTC")]
    pd.testing.assert_frame_equal(full.loc[shared], part.loc[shared])
    assert np.isfinite(full[["mid", "microprice", "imbalance_20"]].to_numpy()).all()
