"""Backtest accounting on hand-checkable series, baseline causality, signals, and one small end-to-end run."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from hf_kvtrade import BinnedDistribution, KVTradeForCausalLM
from hf_kvtrade.backtest import (
    allocation_weights,
    backtest_series,
    garch_positions,
    momentum_positions,
    performance,
    periods_per_year,
    pretest_volatility,
    run_backtest,
    simulate,
)
from hf_kvtrade.presets import load_preset
from hf_kvtrade.signals import Signal, SignalRule, VolTargetRule

DAYS = pd.date_range("2020-01-01", periods=4, freq="D", tz="UTC")


def test_single_asset_accounting_by_hand():
    # Bars return +10%, -10%, +10%, 0%; we hold long, short, flat, long; cost 1% of each traded fraction.
    asset_returns = pd.Series([0.10, -0.10, 0.10, 0.0], index=DAYS)
    positions = pd.Series([1.0, -1.0, 0.0, 1.0], index=DAYS)
    book = simulate(positions, asset_returns, transaction_cost=0.01)
    # Trades: 1 (open), 2 (flip), 1 (close), 1 (reopen).
    np.testing.assert_allclose(book["traded"], [1.0, 2.0, 1.0, 1.0])
    np.testing.assert_allclose(book["net"], [0.10 - 0.01, 0.10 - 0.02, 0.0 - 0.01, 0.0 - 0.01])
    metrics = performance(book, annualization=252)
    assert metrics["total_return"] == pytest.approx(1.09 * 1.08 * 0.99 * 0.99 - 1.0)
    assert metrics["turnover"] == pytest.approx(5.0)
    assert metrics["costs"] == pytest.approx(0.05)
    # In the market on bars 1, 2 and 4; winners are bars 1 and 2.
    assert metrics["win_rate"] == pytest.approx(2 / 3)
    assert metrics["exposure"] == pytest.approx(0.75)
    assert metrics["max_drawdown"] == pytest.approx(0.99 * 0.99 - 1.0)


def test_portfolio_accounting_by_hand():
    asset_returns = pd.DataFrame({"a": [0.02, -0.01], "b": [0.00, 0.03]}, index=DAYS[:2])
    weights = pd.DataFrame({"a": [0.5, 1.0], "b": [0.5, 0.0]}, index=DAYS[:2])
    book = simulate(weights, asset_returns, transaction_cost=0.001)
    np.testing.assert_allclose(book["traded"], [1.0, 1.0])
    np.testing.assert_allclose(book["net"], [0.01 - 0.001, -0.01 - 0.001])


def test_allocations_follow_the_forecast_kelly_fractions():
    mean = pd.DataFrame({"a": [0.002, -0.001], "b": [0.001, -0.002]})
    std = pd.DataFrame({"a": [0.01, 0.01], "b": [0.01, 0.01]})
    long_only = allocation_weights(mean, std, long_only=True)
    np.testing.assert_allclose(long_only.to_numpy(), [[2 / 3, 1 / 3], [0.0, 0.0]])
    long_short = allocation_weights(mean, std, long_only=False)
    np.testing.assert_allclose(long_short.to_numpy(), [[2 / 3, 1 / 3], [-1 / 3, -2 / 3]])


def test_baselines_only_use_the_past():
    from arch.univariate import GARCH, ConstantMean, Normal

    # Volatility clustering, so the fitted GARCH reacts to shocks.
    process = ConstantMean(None, volatility=GARCH(), distribution=Normal(seed=np.random.default_rng(0)))
    percent_returns = process.simulate([0.0, 0.05, 0.1, 0.85], 600)
    index = pd.date_range("2000-01-01", periods=600, freq="B", tz="UTC")
    closes = pd.Series(100 * np.exp(np.cumsum(percent_returns["data"].to_numpy() / 100)), index=index)
    test_start = index[500]
    shocked = closes.copy()
    shocked.iloc[550:] *= 1.5  # a jump at bar 550 may only move positions from bar 551 on
    for rule in (
        lambda c: momentum_positions(c, 20, allow_short=True),
        lambda c: garch_positions(c, test_start),
    ):
        before, after = rule(closes), rule(shocked)
        pd.testing.assert_series_equal(before.iloc[:551], after.iloc[:551])
        assert not np.allclose(before.iloc[551:], after.iloc[551:])
    assert set(momentum_positions(closes, 20, allow_short=False).unique()) <= {0.0, 1.0}


def test_signal_rule_needs_probability_and_edge_over_costs():
    rule = SignalRule(prob_threshold=0.55, transaction_cost=0.001, cost_multiple=2.0)
    assert rule.decide(0.60, 0.003) is Signal.LONG
    assert rule.decide(0.60, 0.001) is Signal.NEUTRAL  # edge below the round-trip cost
    assert rule.decide(0.52, 0.003) is Signal.NEUTRAL  # not confident enough
    assert rule.decide(0.40, -0.003) is Signal.SHORT
    assert SignalRule(allow_short=False).decide(0.1, -0.1) is Signal.NEUTRAL
    with pytest.raises(ValueError, match="prob_threshold"):
        SignalRule(prob_threshold=0.4)
    with pytest.raises(ValueError, match="transaction_cost"):
        SignalRule(transaction_cost=-1.0)


EDGES = np.array([-0.02, -0.01, 0.0, 0.01, 0.02])
FLAT = BinnedDistribution(np.array([0.0, 0.5, 0.5, 0.0]), EDGES)  # std 0.0057735, P(up) 1/2
BEARISH = BinnedDistribution(np.array([0.4, 0.4, 0.2, 0.0]), EDGES)  # std 0.0080208, P(up) 0.2


class ScriptedEngine:
    """Stands in for the StreamingForecaster: at each timestamp it forecasts what ``script`` says."""

    def __init__(self, script):
        self.script = script

    def prime(self, symbol, prices):
        pass

    def update(self, symbol, bar):
        distribution = self.script(bar["timestamp"])
        return SimpleNamespace(
            prob_up=float(distribution.prob_up()), mean_return=float(distribution.mean()), distribution=distribution,
            signal=Signal.NEUTRAL, latency_ms=1.0, forecast=SimpleNamespace(last_price=bar["close"]),
        )  # fmt: skip


def test_vol_target_strategy_trades_the_forecasts_one_bar_later():
    rng = np.random.default_rng(0)
    index = pd.date_range("2000-01-03", periods=260, freq="B", tz="UTC")
    closes = pd.Series(100 * np.exp(np.cumsum(rng.normal(0, 0.01, 260))), index=index)
    test_start = index[250]
    bearish_at = index[254]  # the forecast made at this close is for the bar that ends at index[255]
    engine = ScriptedEngine(lambda timestamp: BEARISH if timestamp == bearish_at else FLAT)
    rule = SignalRule(transaction_cost=1e-4)
    result = backtest_series(engine, "x", closes, test_start, rule, warmup=10,
                             vol_rule=VolTargetRule(target_vol=0.01, transaction_cost=1e-4))  # fmt: skip
    book = result["books"]["model_vol_target"]
    # 0.01 / 0.0057735 = 1.7321 long on every bar, except -0.01 / 0.0080208 = -1.2468 after the bearish forecast.
    expected = pd.Series(1.7321, index=index[251:])
    expected[index[255]] = -1.2468
    np.testing.assert_allclose(book["position"], expected, rtol=1e-4)
    # Opening 1.7321 costs 1 bp of it; the flip to short trades 1.7321 + 1.2468 = 2.9789.
    bar_return = closes.iloc[251] / closes.iloc[250] - 1
    assert book["net"].iloc[0] == pytest.approx(1.7321 * bar_return - 1e-4 * 1.7321, rel=1e-4)
    assert book["traded"][index[255]] == pytest.approx(2.9789, rel=1e-4)
    assert result["vol_target"] == 0.01
    assert set(result["metrics"]) == {"model", "model_vol_target", "buy_and_hold", "flat", "momentum", "garch_vol_scaled"}


def test_default_vol_target_is_the_pretest_volatility():
    # Log-returns alternate +1% and -1%: 250 of them before the test start have mean 0 and sample std
    # 0.01 * sqrt(250 / 249) = 0.0100201.
    index = pd.date_range("2000-01-03", periods=261, freq="B", tz="UTC")
    closes = pd.Series(100 * np.exp(0.01 * np.cumsum([0.0] + [(-1) ** k for k in range(260)])), index=index)
    assert pretest_volatility(closes, index[251]) == pytest.approx(0.0100201, rel=1e-5)
    assert pretest_volatility(closes, index[251]) == pytest.approx(pretest_volatility(closes[:251], index[251]))


def test_periods_per_year_from_bar_spacing():
    assert periods_per_year(pd.date_range("2020-01-01", periods=10, freq="B")) == 252
    assert periods_per_year(pd.date_range("2020-01-01", periods=10, freq="h")) == 252 * 24


def test_end_to_end_run_writes_report_and_plots(tmp_path):
    torch.manual_seed(0)
    model = KVTradeForCausalLM(load_preset("tiny")).eval()
    rule = SignalRule(prob_threshold=0.5, transaction_cost=1e-4)
    report = run_backtest(
        model,
        None,
        tmp_path,
        series=["sp500"],
        portfolio=["skfolio_aapl", "skfolio_jpm"],
        rule=rule,
        warmup=32,
        limit=12,
        model_description="tiny random",
    )
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["series"]["sp500"]["bars"] == 12
    assert set(saved["series"]["sp500"]["metrics"]) == {
        "model", "model_vol_target", "buy_and_hold", "flat", "momentum", "garch_vol_scaled"}  # fmt: skip
    # Both rules trade the same forecasts; the vol-targeting one aims at the S&P 500's own pre-test daily std.
    assert saved["vol_target_rule"]["target_vol"] is None and saved["vol_target_rule"]["transaction_cost"] == 1e-4
    assert 0.005 < saved["series"]["sp500"]["vol_target"] < 0.02
    assert set(saved["multi_asset"]["metrics"]) == {"long_only", "long_short", "equal_weight"}
    assert saved["series"]["sp500"]["metrics"]["flat"]["total_return"] == 0.0
    assert saved["latency"]["ticks"] == report["latency"]["ticks"] == 13 + 2 * 13
    for name in saved["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
