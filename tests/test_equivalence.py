"""The same prices give the same forecast on every Transformers path, on the shipped checkpoint, past its window.

`Forecaster.predict` is the reference: a stateless call given the whole history. The streaming engine, bar by bar
and through `prime`, must agree with it at every tick, across rebases of the context policy. The vLLM paths are
held to the same reference in test_vllm_engine.py and test_vllm_server.py.
"""

import numpy as np
import pytest
import torch

from hf_kvtrade import Forecaster
from hf_kvtrade.checkpoint import SHIPPED_CHECKPOINT
from hf_kvtrade.data import load_series
from hf_kvtrade.evaluation import model_forecast
from hf_kvtrade.streaming import StreamingForecaster

TOLERANCE = 1e-5  # fp32, on next-bar bin probabilities


@pytest.fixture(scope="module")
def forecaster():
    return Forecaster.from_pretrained(SHIPPED_CHECKPOINT)


@pytest.fixture(scope="module")
def prices(forecaster):
    """Real closes, three policy windows and 17 bars long."""
    window = forecaster.context_policy.window
    return load_series("sp500")["close"].to_numpy()[-(3 * window + 17) :]


def test_the_shipped_policy_rebases_inside_the_tested_stretch(forecaster, prices):
    policy = forecaster.context_policy
    anchors = {policy.start(n) for n in range(policy.window + 17, len(prices) + 1)}
    assert len(anchors) >= 4, anchors


def test_engine_bar_by_bar_equals_the_forecaster_at_every_tick(forecaster, prices):
    policy = forecaster.context_policy
    window = policy.window
    engine = StreamingForecaster(forecaster.model, forecaster.tokenizer)
    first_checked = len(prices) - 2 * window
    ids = forecaster.tokenizer.encode(prices)
    # Forecaster.predict(prices[:n]) at every bar, n < len(prices), computed in one batched pass per policy window;
    # that this equals predict bar by bar is tested in test_evaluation.py, and it is re-checked below at the
    # rebases and every 64th bar.
    every_bar = model_forecast(forecaster.model, forecaster.tokenizer, ids, first_checked + 1, policy)
    rebases = {n for n in range(first_checked + 1, len(prices) + 1) if policy.start(n) != policy.start(n - 1)}
    engine.prime("spx", prices[:first_checked])
    for n in range(first_checked + 1, len(prices) + 1):
        tick = engine.update("spx", prices[n - 1])
        assert tick.context_tokens == len(policy.select(ids[:n])), f"bar {n}"
        if n < len(prices):
            expected = every_bar.probs[n - first_checked - 1]
            np.testing.assert_allclose(tick.distribution.probs, expected, atol=TOLERANCE, err_msg=f"bar {n}")
        if n in rebases or n % 64 == 0 or n == len(prices):
            expected = forecaster.predict(prices[:n]).distribution.probs
            np.testing.assert_allclose(tick.distribution.probs, expected, atol=TOLERANCE, err_msg=f"bar {n}")
    assert len(rebases) >= 3, rebases
    # Between rebases a tick costs one token: far fewer prefills than ticks.
    assert engine.prefills <= 2 * window // policy.stride + 2


@pytest.mark.parametrize("offset", [0, 1, 17, 511, 512, 513])
def test_prime_equals_the_forecaster(forecaster, prices, offset):
    history = prices[: len(prices) - offset]
    engine = StreamingForecaster(forecaster.model, forecaster.tokenizer)
    tick = engine.prime("spx", history)
    expected = forecaster.predict(history)
    np.testing.assert_allclose(tick.distribution.probs, expected.distribution.probs, atol=TOLERANCE)
    np.testing.assert_allclose(tick.forecast.return_quantiles, expected.return_quantiles, atol=1e-9)


def test_sampled_paths_never_leave_the_trained_window(forecaster, prices):
    policy = forecaster.context_policy
    horizon = 12
    context = forecaster.encode_context(prices, horizon)
    assert context.shape[1] + horizon <= policy.window
    forecast = forecaster.predict(prices, horizon=horizon, num_samples=8, seed=0)
    assert forecast.paths.shape == (8, horizon)
    with pytest.raises(ValueError, match="horizon must lie in"):
        forecaster.predict(prices, horizon=policy.max_horizon + 1)


def test_a_market_prefix_shortens_the_symbol_window(forecaster, prices):
    engine = StreamingForecaster(forecaster.model, forecaster.tokenizer)
    engine.set_market_context(prices[:40])
    for price in prices[40:]:
        tick = engine.update("spx", price)
        assert tick.context_tokens < forecaster.context_policy.window
    context = engine.context_ids("spx")
    with torch.inference_mode():
        logits = forecaster.model(input_ids=torch.tensor([context])).logits[0, -1]
    expected = torch.softmax(logits.double(), dim=-1)[forecaster.tokenizer.first_bin_id :]
    np.testing.assert_allclose(tick.distribution.probs, (expected / expected.sum()).numpy(), atol=TOLERANCE)
