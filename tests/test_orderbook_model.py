"""The order-book model: tokenizer prefix property, cached-vs-full equivalence, the analyzer on a short replay."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hf_kvtrade.cache import build_cache
from hf_kvtrade.data.archives import DataNotFetchedError
from hf_kvtrade.orderbook import features
from hf_kvtrade.orderbook.analyzer import StreamingOrderBookAnalyzer
from hf_kvtrade.orderbook.evaluation import model_move_probs, move_targets
from hf_kvtrade.orderbook.tokenizer import OrderBookTokenizer
from hf_kvtrade.orderbook.training import load_orderbook_model, split_by_time

# The checkpoint committed in this checkout (installed as package data: SHIPPED_ORDERBOOK_CHECKPOINT).
CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "kvtrade-orderbook"


def _ticks(num_ticks, seed=0):
    rng = np.random.default_rng(seed)
    mid = 78_000 + 0.5 * np.cumsum(rng.choice([-2, -1, 0, 0, 0, 0, 1, 3], num_ticks))
    return pd.DataFrame({"mid": mid, "imbalance_1": rng.uniform(-1, 1, num_ticks), "ofi": rng.normal(0, 0.5, num_ticks)})


def test_tokenizer_is_prefix_stable_and_tick_by_tick():
    tokenizer = OrderBookTokenizer()
    frame = _ticks(200)
    frame.loc[7, "imbalance_1"] = np.nan  # an empty book side
    ids = tokenizer.encode(frame)
    assert len(ids) == 3 * len(frame) and ids[0] == tokenizer.missing_token_id and ids[22] == tokenizer.missing_token_id
    for cut in (1, 2, 57, 199):
        np.testing.assert_array_equal(tokenizer.encode(frame.iloc[:cut]), ids[: 3 * cut])
    one_by_one = [tokenizer.encode_ticks([row.mid], [row.imbalance_1], [row.ofi], previous) for previous, row in
                  zip([np.nan, *frame["mid"].iloc[:-1]], frame.itertuples())]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate(one_by_one), ids)
    moves = tokenizer.move_steps[ids[3::3] - tokenizer.first_move_id]
    np.testing.assert_array_equal(moves, np.clip(np.rint(np.diff(frame["mid"]) / 0.5), -8, 8))
    assert ids.max() < tokenizer.vocab_size and np.delete(ids[1::3], 7).min() >= tokenizer.first_imbalance_id


def test_tokenizer_rejects_bad_input_and_round_trips(tmp_path):
    tokenizer = OrderBookTokenizer(max_move=4, ofi_edges=(-1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="imbalance at tick 1 is 1.5"):
        tokenizer.encode_ticks([1.0, 1.5], [0.0, 1.5], [0.0, 0.0])
    with pytest.raises(ValueError, match="no column 'ofi'"):
        tokenizer.encode(pd.DataFrame({"mid": [1.0], "imbalance_1": [0.0]}))
    with pytest.raises(ValueError, match="strictly increasing"):
        OrderBookTokenizer(ofi_edges=(1.0, 0.0))
    tokenizer.save_pretrained(tmp_path)
    assert OrderBookTokenizer.from_pretrained(tmp_path) == tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shipped():
    return load_orderbook_model(CHECKPOINT)


def test_cached_step_by_step_logits_equal_one_full_forward(shipped):
    model, tokenizer = shipped
    ids = torch.as_tensor(tokenizer.encode(_ticks(100)))[None]  # 300 tokens: inside the 384-token window
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        for policy in ("full", "int8"):
            cache = build_cache(model.config, policy)
            steps = [model(input_ids=ids[:, s : s + 3], past_key_values=cache, use_cache=True).logits for s in range(0, ids.shape[1], 3)]
            difference = (torch.cat(steps, dim=1) - full).abs().max().item()
            assert difference < (1e-5 if policy == "full" else 5e-2), (policy, difference)


@pytest.fixture(scope="module")
def capture():
    from hf_kvtrade.orderbook import capture as module

    try:
        return module.load_orders(), module.load_trades()
    except DataNotFetchedError as error:
        pytest.skip(f"ob-analytics 0.1.0 wheel not fetched ({error})")


def test_analyzer_replay_matches_batch_features_and_full_forward(shipped, capture):
    """A short replay (the first 45,000 events, about 4 minutes of ticks, three rebases): the analyzer's ticks are the
    batch features' ticks, and with the full cache its forecasts are the full forward over the policy's contexts."""
    model, tokenizer = shipped
    orders, trades = capture
    orders = orders.iloc[:45_000]
    trades = trades[trades["exchange_timestamp"] <= orders["exchange_timestamp"].iloc[-1]]
    frame = features(orders, trades)
    analyzer = StreamingOrderBookAnalyzer(model, tokenizer, cache_policy="full")
    forecasts = list(analyzer.replay(orders, trades))
    assert [f.tick_ms for f in forecasts] == frame.index.as_unit("ms").asi8.tolist()
    np.testing.assert_array_equal([f.mid for f in forecasts], frame["mid"].to_numpy())
    np.testing.assert_allclose([f.trade_flow for f in forecasts], frame["trade_flow"].to_numpy(), rtol=1e-12, atol=1e-12)
    assert analyzer.rebases >= 3 and analyzer.context_length < model.config.training_context_length
    ticks, _ = move_targets(frame, tokenizer)
    expected = model_move_probs(model, tokenizer, tokenizer.encode(frame), 1, len(frame))
    streamed = np.stack([forecasts[t - 1].probs for t in ticks])
    np.testing.assert_allclose(streamed, expected, atol=1e-5)


def test_int8_analyzer_forecasts_every_tick_with_a_quantized_cache(shipped, capture):
    model, tokenizer = shipped
    orders, trades = capture
    analyzer = StreamingOrderBookAnalyzer(model, tokenizer)
    forecasts = list(analyzer.replay(orders.iloc[:20_000], trades.iloc[:0]))
    assert analyzer.cache_bytes() > 0 and type(analyzer._cache).__name__ == "QuantizedKVCache"
    last = forecasts[-1]
    assert np.isclose(last.probs.sum(), 1) and last.prob_up + last.prob_down < 1
    low, median, high = last.mid_quantiles((0.05, 0.5, 0.95))
    assert low <= median <= high


def test_time_split_is_20_5_5_minutes():
    index = pd.date_range("2026-05-02 02:36:20.1", periods=18_000, freq="100ms", tz="UTC")
    assert split_by_time(pd.DataFrame(index=index)) == (12_000, 15_000)


def test_orderbook_checkpoint_carries_the_package_model_code():
    # Regenerate with hf_kvtrade.checkpoint.refresh_remote_code(CHECKPOINT) after changing the model code.
    from hf_kvtrade.checkpoint import stale_remote_code

    assert stale_remote_code(CHECKPOINT) == []
