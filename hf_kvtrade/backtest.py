"""Walk-forward backtest of the streaming forecaster on held-out bars, against simple baselines.

Timing convention: the position held over bar ``t`` (from close ``t-1`` to close ``t``) is decided at close
``t-1``, from information up to that close only. Positions are fractions of equity, rebalanced to target at
every close; a change of position costs ``transaction_cost`` times the traded fraction. Drift of weights inside a
bar is ignored (one rebalance per bar), which keeps the accounting hand-checkable.

Each series is traded by two forecast-driven rules on the same streamed forecasts: ``model`` follows the
all-or-nothing :class:`~hf_kvtrade.signals.SignalRule`, ``model_vol_target`` the position sized by the forecast
volatility (:class:`~hf_kvtrade.signals.VolTargetRule`), whose default target is the series' own std before the
test period, the same target as the ``garch_vol_scaled`` baseline.

Risk and return metrics come from empyrical; only the win rate (which it lacks) is counted here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import empyrical
import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from .signals import SignalRule, VolTargetRule
from .streaming import StreamingForecaster

TRADING_DAYS_PER_YEAR = 252


def periods_per_year(index: pd.DatetimeIndex) -> float:
    """Bars per year for annualising, from the median bar spacing: 252 trading days' worth of intraday or daily
    bars, calendar time for slower ones."""
    if len(index) < 2:
        raise ValueError("need at least two timestamps to infer the bar frequency")
    spacing = pd.Series(index).diff().median()
    bars_per_day = pd.Timedelta(days=1) / spacing
    if bars_per_day >= 1:
        return TRADING_DAYS_PER_YEAR * bars_per_day
    return pd.Timedelta(days=365.25) / spacing


def simulate(positions: pd.Series, asset_returns: pd.Series, transaction_cost: float) -> pd.DataFrame:
    """Bar-by-bar accounting of one asset.

    ``positions[t]`` is held over bar ``t`` and ``asset_returns[t]`` is that bar's simple return. The book starts
    flat, so the first position pays for its whole size.
    """
    if not positions.index.equals(asset_returns.index):
        raise ValueError("positions and asset_returns must share one index")
    if transaction_cost < 0:
        raise ValueError(f"transaction_cost must be >= 0, got {transaction_cost}")
    traded = positions.diff().abs()
    traded.iloc[0] = abs(positions.iloc[0])
    gross = positions * asset_returns
    costs = transaction_cost * traded
    return pd.DataFrame({"position": positions, "gross": gross, "cost": costs, "traded": traded, "net": gross - costs})


def simulate_portfolio(weights: pd.DataFrame, asset_returns: pd.DataFrame, transaction_cost: float) -> pd.DataFrame:
    """``simulate`` for a book of assets: ``weights[t, i]`` held over bar ``t``; costs on the summed trades."""
    if not (weights.index.equals(asset_returns.index) and weights.columns.equals(asset_returns.columns)):
        raise ValueError("weights and asset_returns must share index and columns")
    traded = weights.diff().abs()
    traded.iloc[0] = weights.iloc[0].abs()
    gross = (weights * asset_returns).sum(axis=1)
    costs = transaction_cost * traded.sum(axis=1)
    return pd.DataFrame(
        {"gross": gross, "cost": costs, "traded": traded.sum(axis=1), "net": gross - costs, "gross_exposure": weights.abs().sum(axis=1)}
    )


def performance(book: pd.DataFrame, annualization: float) -> dict[str, float]:
    """Metrics of a ``simulate`` result; the win rate counts bars with a position that made money after costs."""
    net = book["net"]
    exposed = book["position"].ne(0) if "position" in book else book["gross_exposure"].gt(0)
    return {
        "total_return": float(empyrical.cum_returns_final(net)),
        "annual_return": float(empyrical.annual_return(net, annualization=annualization)),
        "annual_volatility": float(empyrical.annual_volatility(net, annualization=annualization)),
        "sharpe": _finite(empyrical.sharpe_ratio(net, annualization=annualization)),
        "sortino": _finite(empyrical.sortino_ratio(net, annualization=annualization)),
        "max_drawdown": float(empyrical.max_drawdown(net)),
        "win_rate": float((net[exposed] > 0).mean()) if exposed.any() else None,
        "turnover": float(book["traded"].sum()),
        "costs": float(book["cost"].sum()),
        "exposure": float(exposed.mean()),
    }


def _finite(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def pretest_volatility(closes: pd.Series, test_start: pd.Timestamp) -> float:
    """Std of the log-returns before ``test_start``: the volatility target of the vol-scaled strategies."""
    log_returns = np.log(closes).diff().dropna()
    before = log_returns[log_returns.index < test_start]
    if len(before) < 2:
        raise ValueError(f"need at least 2 returns before the test period, got {len(before)}")
    return float(before.std())


# -------------------------------------------------------------------------------------------------- baselines
def momentum_positions(closes: pd.Series, lookback: int, allow_short: bool) -> pd.Series:
    """Sign of the trailing ``lookback``-bar return at the previous close."""
    trailing = np.sign(np.log(closes).diff(lookback)).shift(1).fillna(0.0)
    return trailing if allow_short else trailing.clip(lower=0.0)


def garch_positions(
    closes: pd.Series, test_start: pd.Timestamp, max_leverage: float = 2.0
) -> pd.Series:
    """Long, scaled to a constant volatility with GARCH(1,1) one-bar-ahead forecasts.

    The model is fitted on the bars before ``test_start`` only; its fixed parameters then filter the whole
    series, so each forecast for bar ``t`` uses returns up to ``t-1``. The target is the fitted period's own
    volatility, so the rule is fully invested on average.
    """
    from arch import arch_model

    log_returns = np.log(closes).diff().dropna()
    before_test = log_returns.index < test_start
    if before_test.sum() < 100:
        raise ValueError(f"GARCH needs at least 100 bars before the test period, got {before_test.sum()}")
    # arch's optimiser wants returns of order one; the positions do not depend on the unit.
    returns = log_returns / log_returns[before_test].std()
    fit_returns = returns[before_test]
    fitted = arch_model(fit_returns, mean="Constant", vol="GARCH", p=1, q=1, dist="t").fit(disp="off")
    filtered = arch_model(returns, mean="Constant", vol="GARCH", p=1, q=1, dist="t").fix(fitted.params)
    # Row t of the forecast is the variance of bar t+1 given returns up to t.
    next_variance = filtered.forecast(horizon=1, start=0, reindex=True).variance["h.1"].shift(1)
    target = fit_returns.std()
    positions = (target / np.sqrt(next_variance)).clip(upper=max_leverage)
    return positions.reindex(closes.index).fillna(0.0)


# -------------------------------------------------------------------------------------------- walk-forward
@dataclass
class StreamedForecasts:
    """Per test bar: the forecast made at its close for the next bar."""

    prob_up: pd.Series
    mean_return: pd.Series
    std_return: pd.Series
    signal: pd.Series
    pit: pd.Series  # CDF of the forecast at the realised next log-return
    crps: pd.Series
    latencies_ms: np.ndarray


def stream_forecasts(
    engine: StreamingForecaster, symbol: str, history: pd.Series, test: pd.Series, progress: tqdm | None = None
) -> StreamedForecasts:
    """Primes ``symbol`` on ``history`` in one prefill, then feeds ``test`` bar by bar through the engine."""
    engine.prime(symbol, history.to_numpy())
    rows = []
    previous = None
    for timestamp, close in test.items():
        tick = engine.update(symbol, {"close": close, "timestamp": timestamp})
        realised = None if previous is None else np.log(close / previous.forecast.last_price)
        if previous is not None:
            rows[-1].update(
                pit=float(previous.distribution.cdf(realised)), crps=float(previous.distribution.crps(realised))
            )
        rows.append(
            {
                "timestamp": timestamp,
                "prob_up": tick.prob_up,
                "mean_return": tick.mean_return,
                "std_return": float(tick.distribution.std()),
                "signal": int(tick.signal),
                "latency_ms": tick.latency_ms,
                "pit": np.nan,
                "crps": np.nan,
            }
        )
        previous = tick
        if progress is not None:
            progress.update(1)
    frame = pd.DataFrame(rows).set_index("timestamp")
    return StreamedForecasts(
        prob_up=frame.prob_up,
        mean_return=frame.mean_return,
        std_return=frame.std_return,
        signal=frame.signal,
        pit=frame.pit,
        crps=frame.crps,
        latencies_ms=frame.latency_ms.to_numpy(),
    )


def forecast_quality(forecasts: StreamedForecasts, closes: pd.Series) -> dict[str, float]:
    """Calibration of the streamed forecasts: PIT uniformity (KS test), CRPS and the hit rate of P(up) > 1/2."""
    pit = forecasts.pit.dropna()
    went_up = (np.log(closes).diff().shift(-1) > 0).reindex(pit.index)
    ks = stats.kstest(pit.to_numpy(), "uniform")
    return {
        "forecasts": int(len(pit)),
        "mean_crps": float(forecasts.crps.dropna().mean()),
        "pit_ks_statistic": float(ks.statistic),
        "pit_ks_pvalue": float(ks.pvalue),
        "direction_hit_rate": float(((forecasts.prob_up.reindex(pit.index) > 0.5) == went_up).mean()),
        "mean_prob_up": float(forecasts.prob_up.mean()),
    }


def backtest_series(
    engine: StreamingForecaster,
    symbol: str,
    closes: pd.Series,
    test_start: pd.Timestamp,
    rule: SignalRule,
    warmup: int,
    momentum_lookback: int = 20,
    progress: tqdm | None = None,
    vol_rule: VolTargetRule | None = None,
) -> dict:
    """All single-asset strategies over the test bars of one series; returns books, metrics and forecasts.

    ``vol_rule`` defaults to a :class:`VolTargetRule` with ``rule``'s costs and shorting; without a target of its
    own it aims at :func:`pretest_volatility`.
    """
    history = closes[closes.index < test_start].iloc[-warmup:]
    test = closes[closes.index >= test_start]
    if len(test) < 3:
        raise ValueError(f"{symbol}: the test period has {len(test)} bars; need at least 3")
    forecasts = stream_forecasts(engine, symbol, history, test, progress)
    vol_rule = vol_rule or VolTargetRule(transaction_cost=rule.transaction_cost, allow_short=rule.allow_short)
    vol_target = vol_rule.target_vol or pretest_volatility(closes, test_start)
    vol_targeted = vol_rule.position(forecasts.prob_up.to_numpy(), forecasts.std_return.to_numpy(), vol_target)
    # Bar t of the evaluation runs from test close t-1 to test close t.
    asset_returns = test.pct_change().iloc[1:]
    positions = {
        "model": forecasts.signal.shift(1).iloc[1:].astype(float),
        "model_vol_target": pd.Series(vol_targeted, index=forecasts.prob_up.index).shift(1).iloc[1:],
        "buy_and_hold": pd.Series(1.0, index=asset_returns.index),
        "flat": pd.Series(0.0, index=asset_returns.index),
        "momentum": momentum_positions(closes, momentum_lookback, rule.allow_short).reindex(asset_returns.index),
        "garch_vol_scaled": garch_positions(closes, test_start).reindex(asset_returns.index),
    }
    books = {name: simulate(position, asset_returns, rule.transaction_cost) for name, position in positions.items()}
    annualization = periods_per_year(test.index)
    return {
        "books": books,
        "forecasts": forecasts,
        "metrics": {name: performance(book, annualization) for name, book in books.items()},
        "quality": forecast_quality(forecasts, test),
        "annualization": annualization,
        "vol_target": vol_target,
        "test_start": str(test.index[0]),
        "test_end": str(test.index[-1]),
        "bars": int(len(asset_returns)),
    }


def allocation_weights(mean_return: pd.DataFrame, std_return: pd.DataFrame, long_only: bool) -> pd.DataFrame:
    """Weights proportional to each asset's forecast Kelly fraction (mean / variance), gross exposure at most 1.

    Long-only keeps the positive fractions and leaves the book in cash when none is positive.
    """
    kelly = mean_return / std_return.pow(2)
    if long_only:
        kelly = kelly.clip(lower=0.0)
    gross = kelly.abs().sum(axis=1)
    return kelly.div(gross.where(gross > 0), axis=0).fillna(0.0)


def backtest_portfolio(
    engine: StreamingForecaster,
    closes: pd.DataFrame,
    test_start: pd.Timestamp,
    rule: SignalRule,
    warmup: int,
    progress: tqdm | None = None,
) -> dict:
    """Forecast-driven allocations (long-only and long-short) against equal weight, over shared test bars.

    All assets are streamed bar by bar through one engine (one session per asset): each bar's closes of every
    asset go through one batched ``update_many`` step before the weights for the next bar are set.
    """
    history = closes[closes.index < test_start].iloc[-warmup:]
    test = closes[closes.index >= test_start]
    for symbol in closes.columns:
        engine.prime(symbol, history[symbol].to_numpy())
    means, stds = [], []
    for timestamp, row in test.iterrows():
        ticks = engine.update_many({symbol: {"close": price, "timestamp": timestamp} for symbol, price in row.items()})
        means.append({symbol: tick.mean_return for symbol, tick in ticks.items()})
        stds.append({symbol: float(tick.distribution.std()) for symbol, tick in ticks.items()})
        if progress is not None:
            progress.update(len(ticks))
    mean_return = pd.DataFrame(means, index=test.index)
    std_return = pd.DataFrame(stds, index=test.index)
    asset_returns = test.pct_change().iloc[1:]
    equal = pd.DataFrame(1.0 / test.shape[1], index=asset_returns.index, columns=test.columns)
    weights = {
        "long_only": allocation_weights(mean_return, std_return, long_only=True).shift(1).iloc[1:],
        "long_short": allocation_weights(mean_return, std_return, long_only=False).shift(1).iloc[1:],
        "equal_weight": equal,
    }
    books = {name: simulate_portfolio(w, asset_returns, rule.transaction_cost) for name, w in weights.items()}
    annualization = periods_per_year(test.index)
    return {
        "books": books,
        "metrics": {name: performance(book, annualization) for name, book in books.items()},
        "symbols": list(test.columns),
        "test_start": str(test.index[0]),
        "test_end": str(test.index[-1]),
        "bars": int(len(asset_returns)),
    }


# ------------------------------------------------------------------------------------------------ full run
def _test_start(closes: pd.Series) -> pd.Timestamp:
    from .data import split_periods

    _, _, test = split_periods(closes.to_frame("close"))
    return test.index[0]


def run_backtest(
    model,
    tokenizer,
    out_dir,
    series: list[str],
    portfolio: list[str],
    rule: SignalRule,
    warmup: int = 512,
    cache_policy: str = "full",
    limit: int | None = None,
    model_description: str = "",
    vol_rule: VolTargetRule | None = None,
) -> dict:
    """Backtests every series in ``series`` and the book of ``portfolio`` on their held-out periods; writes
    ``report.json`` and PNG plots into ``out_dir`` and returns the report.

    Each series is traded by ``rule`` and by ``vol_rule`` (default: a :class:`VolTargetRule` with ``rule``'s
    costs and shorting, aimed at each series' pre-test volatility) against the same baselines."""
    import json
    import os

    from . import plots
    from .data import load_series

    if warmup < 2:
        raise ValueError(f"warmup must be at least 2 bars, got {warmup}")
    os.makedirs(out_dir, exist_ok=True)
    closes = {name: load_series(name)["close"] for name in dict.fromkeys(series + portfolio)}
    starts = {name: _test_start(close) for name, close in closes.items()}
    if limit is not None:
        # Keep only the first ``limit`` test bars (plus everything before them, for warm-up and GARCH).
        closes = {
            name: close[: close.index.searchsorted(starts[name]) + limit + 1] for name, close in closes.items()
        }
    # `--portfolio` with no names trades the series only.
    portfolio_closes = (
        pd.concat({name: closes[name] for name in portfolio}, axis=1, join="inner").dropna() if portfolio else None
    )
    portfolio_start = max(starts[name] for name in portfolio) if portfolio else None
    total_ticks = sum(int((closes[name].index >= starts[name]).sum()) for name in series)
    if portfolio:
        total_ticks += int((portfolio_closes.index >= portfolio_start).sum()) * len(portfolio)

    vol_rule = vol_rule or VolTargetRule(transaction_cost=rule.transaction_cost, allow_short=rule.allow_short)
    engine = StreamingForecaster(model, tokenizer, cache_policy=cache_policy, signal_rule=rule)
    report = {
        "model": model_description,
        "cache_policy": cache_policy,
        "signal_rule": {
            "prob_threshold": rule.prob_threshold,
            "transaction_cost": rule.transaction_cost,
            "cost_multiple": rule.cost_multiple,
            "allow_short": rule.allow_short,
        },
        "vol_target_rule": asdict(vol_rule),
        "warmup_bars": warmup,
        "series": {},
        "plots": [],
    }
    with tqdm(total=total_ticks, desc="backtest", unit="tick") as progress:
        for name in series:
            result = backtest_series(
                engine, name, closes[name], starts[name], rule, warmup, progress=progress, vol_rule=vol_rule
            )
            report["series"][name] = {
                key: result[key]
                for key in ("test_start", "test_end", "bars", "annualization", "vol_target", "metrics", "quality")
            }
            net = {strategy: book["net"] for strategy, book in result["books"].items()}
            report["plots"].append(plots.plot_equity_curves(net, os.path.join(out_dir, f"equity_{name}.png"), name))
            report["plots"].append(
                plots.plot_drawdowns(net, os.path.join(out_dir, f"drawdown_{name}.png"), f"{name} drawdowns")
            )
            forecasts = result["forecasts"]
            pit = forecasts.pit.dropna()
            went_up = (np.log(closes[name]).diff().shift(-1) > 0).reindex(pit.index).to_numpy()
            report["plots"].append(
                plots.plot_calibration(
                    pit.to_numpy(),
                    forecasts.prob_up.reindex(pit.index).to_numpy(),
                    went_up,
                    os.path.join(out_dir, f"calibration_{name}.png"),
                    f"{name} forecast calibration",
                )
            )
        if portfolio:
            result = backtest_portfolio(engine, portfolio_closes, portfolio_start, rule, warmup, progress=progress)
            report["multi_asset"] = {key: result[key] for key in ("symbols", "test_start", "test_end", "bars", "metrics")}
            net = {strategy: book["net"] for strategy, book in result["books"].items()}
            report["plots"].append(
                plots.plot_equity_curves(net, os.path.join(out_dir, "equity_portfolio.png"), "multi-asset allocations")
            )
            report["plots"].append(
                plots.plot_drawdowns(net, os.path.join(out_dir, "drawdown_portfolio.png"), "multi-asset drawdowns")
            )
    report["latency"] = engine.latency_stats()
    report["plots"].append(plots.plot_latency_histogram(engine.latencies_ms, os.path.join(out_dir, "latency.png")))
    report["plots"] = [os.path.basename(path) for path in report["plots"]]
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


__all__ = [
    "StreamedForecasts",
    "allocation_weights",
    "backtest_portfolio",
    "backtest_series",
    "forecast_quality",
    "garch_positions",
    "momentum_positions",
    "performance",
    "periods_per_year",
    "pretest_volatility",
    "run_backtest",
    "simulate",
    "simulate_portfolio",
    "stream_forecasts",
]
