"""The volatility-targeting rule on hand-computed forecasts, and how it plugs into the streaming engine."""

import numpy as np
import pytest

from hf_kvtrade import BinnedDistribution, Forecast
from hf_kvtrade.signals import Signal, VolTargetRule, forecast_std

EDGES = np.array([-0.02, -0.01, 0.0, 0.01, 0.02])
# Uniform on [-1%, 1%]: std 0.01 / sqrt(3) = 0.0057735, P(up) 1/2.
FLAT = BinnedDistribution(np.array([0.0, 0.5, 0.5, 0.0]), EDGES)
# 40% on [-2%, -1%], 40% on [-1%, 0], 20% on [0, 1%]: P(up) 0.2, mean -0.007,
# E[x^2] = 0.4 * 2.25e-4 + 0.4 * 2.5e-5 + 0.2 * 2.5e-5 + 1e-4 / 12 = 1.1333e-4, variance 1.1333e-4 - 4.9e-5,
# std 0.0080208.
BEARISH = BinnedDistribution(np.array([0.4, 0.4, 0.2, 0.0]), EDGES)


def _forecast(distribution):
    return Forecast.from_distribution(distribution, last_price=100.0, quantiles=(0.05, 0.5, 0.95))


def test_binned_distribution_std_by_hand():
    assert float(FLAT.std()) == pytest.approx(0.0057735, rel=1e-4)
    assert float(BEARISH.std()) == pytest.approx(0.0080208, rel=1e-4)
    assert float(BEARISH.prob_up()) == pytest.approx(0.2)


def test_position_is_target_over_forecast_vol_capped_at_max_leverage():
    rule = VolTargetRule(target_vol=0.01, max_leverage=2.0, transaction_cost=0.0, min_prob_edge=0.02)
    assert rule.position(0.5, 0.02) == pytest.approx(0.5)  # twice the target's vol: half a unit
    assert rule.position(0.5, 0.01) == pytest.approx(1.0)
    assert rule.position(0.5, 0.004) == pytest.approx(2.0)  # 2.5 wanted, capped at 2
    assert rule.position(0.5, 0.0) == pytest.approx(2.0)  # a zero forecast vol hits the cap, never divides by 0
    np.testing.assert_allclose(rule.position(np.array([0.5, 0.5]), np.array([0.02, 0.005])), [0.5, 2.0])


def test_direction_needs_a_probability_edge_that_pays_the_costs():
    # Cost 2 bp, a round trip (cost_multiple 2) = 4 bp. At a 1% std a right call earns sqrt(2/pi) * 1% = 0.798%
    # times |2p - 1|, so |p - 1/2| must exceed 0.0004 / (2 * 0.00798) = 0.0251.
    rule = VolTargetRule(target_vol=0.01, transaction_cost=2e-4)
    assert rule.prob_edge_needed(0.01) == pytest.approx(0.0251, abs=1e-4)
    assert rule.position(0.53, 0.01) == pytest.approx(1.0)  # confident up: long
    assert rule.position(0.52, 0.01) == pytest.approx(1.0)  # not confident: the vol-scaled long by default
    assert rule.position(0.47, 0.01) == pytest.approx(-1.0)  # confident down: short
    assert rule.position(0.48, 0.01) == pytest.approx(1.0)  # 0.02 below 1/2 does not pay: stays long
    # At FX-hourly volatility (0.1% per bar) the same costs need |p - 1/2| > 0.251: P(up) 0.3 is not enough.
    assert rule.prob_edge_needed(0.001) == pytest.approx(0.251, abs=1e-3)
    assert rule.position(0.30, 0.001) == pytest.approx(2.0)  # long, 10x wanted, capped at 2
    assert rule.position(0.24, 0.001) == pytest.approx(-2.0)


def test_without_costs_the_minimum_edge_still_applies():
    rule = VolTargetRule(target_vol=0.01, transaction_cost=0.0, min_prob_edge=0.02)
    assert rule.position(0.485, 0.01) == pytest.approx(1.0)  # 0.015 < 0.02
    assert rule.position(0.475, 0.01) == pytest.approx(-1.0)


def test_long_only_and_flat_fallback_variants():
    long_only = VolTargetRule(target_vol=0.01, transaction_cost=2e-4, allow_short=False)
    assert long_only.position(0.40, 0.01) == 0.0  # confident down: flat instead of short
    assert long_only.position(0.49, 0.01) == pytest.approx(1.0)
    flat = VolTargetRule(target_vol=0.01, transaction_cost=2e-4, fallback="flat")
    assert flat.position(0.51, 0.01) == 0.0  # no confident call: out of the market
    assert flat.position(0.60, 0.01) == pytest.approx(1.0)
    assert flat.position(0.40, 0.02) == pytest.approx(-0.5)


def test_rule_reads_the_forecast_distribution():
    rule = VolTargetRule(target_vol=0.01, transaction_cost=2e-4)
    # FLAT: 0.01 / 0.0057735 = 1.7321, no confident direction, so long.
    assert rule.size(_forecast(FLAT)) == pytest.approx(1.7321, rel=1e-4)
    assert rule(_forecast(FLAT)) is Signal.LONG
    # BEARISH: P(up) 0.2 is 0.3 below 1/2 (0.0196 needed at its std), so short 0.01 / 0.0080208 = 1.2468.
    assert rule.size(_forecast(BEARISH)) == pytest.approx(-1.2468, rel=1e-4)
    assert rule(_forecast(BEARISH)) is Signal.SHORT
    assert VolTargetRule(target_vol=0.01, allow_short=False)(_forecast(BEARISH)) is Signal.NEUTRAL


def test_sampled_path_forecasts_use_the_std_of_their_first_step():
    paths = np.array([[0.02, 0.0], [-0.02, 0.0], [0.02, 0.0], [-0.02, 0.0]])  # first-step std 0.02
    forecast = Forecast.from_paths(paths, last_price=100.0, quantiles=(0.5,))
    assert forecast_std(forecast) == pytest.approx(0.02)
    assert VolTargetRule(target_vol=0.01).size(forecast) == pytest.approx(0.5)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="target_vol is not set"):
        VolTargetRule().position(0.5, 0.01)
    with pytest.raises(ValueError, match="target_vol must be a positive"):
        VolTargetRule(target_vol=0.0)
    with pytest.raises(ValueError, match="max_leverage"):
        VolTargetRule(max_leverage=0.0)
    with pytest.raises(ValueError, match="fallback must be"):
        VolTargetRule(fallback="short")
    with pytest.raises(ValueError, match="min_prob_edge"):
        VolTargetRule(min_prob_edge=0.5)


def test_plugs_into_the_streaming_engine(make_tiny_model, random_walk_prices):
    from hf_kvtrade import Forecaster
    from hf_kvtrade.streaming import StreamingForecaster

    model = make_tiny_model()
    rule = VolTargetRule(target_vol=0.01, transaction_cost=2e-4)
    engine = StreamingForecaster(model, signal_rule=rule)
    engine.prime("X", random_walk_prices[:64])
    tick = engine.update("X", {"close": float(random_walk_prices[64])})
    # The engine's signal is the rule applied to the forecast the Transformers path makes from the same 65 prices.
    assert tick.signal is rule(Forecaster(model).predict(random_walk_prices[:65]))
