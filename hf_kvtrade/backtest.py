"""Walk-forward backtest of the streaming forecaster on held-out bars, against simple baselines.

The position held over bar ``t`` (from close ``t-1`` to close ``t``) is decided at close ``t-1``, from information
up to that close only. Positions are fractions of equity rebalanced to target at every close (drift inside a bar is
ignored); a change of position costs ``transaction_cost`` times the traded fraction. Strategies, baselines and
metrics are described in docs/streaming.md; risk and return metrics come from empyrical.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import empyrical
import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from .data.windows import split_periods
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
    return TRADING_DAYS_PER_YEAR * bars_per_day if bars_per_day >= 1 else pd.Timedelta(days=365.25) / spacing


def simulate(positions, asset_returns, transaction_cost: float) -> pd.DataFrame:
    """Bar-by-bar accounting: ``positions[t]`` is held over bar ``t`` and ``asset_returns[t]`` is that bar's simple
    return, both Series for one asset or DataFrames (one column per asset) for a book, which pays for its summed
    trades. The book starts flat, so the first position pays for its whole size."""
    if isinstance(positions, pd.Series):
        book = simulate(positions.to_frame("asset"), asset_returns.to_frame("asset"), transaction_cost)
        return book.assign(position=positions)
    if not (positions.index.equals(asset_returns.index) and positions.columns.equals(asset_returns.columns)):
        raise ValueError("positions and asset_returns must share index and columns")
    if transaction_cost < 0:
        raise ValueError(f"transaction_cost must be >= 0, got {transaction_cost}")
    trades = positions.diff().abs()
    trades.iloc[0] = positions.iloc[0].abs()
    traded, gross = trades.sum(axis=1), (positions * asset_returns).sum(axis=1)
    costs, exposure = transaction_cost * traded, positions.abs().sum(axis=1)
    return pd.DataFrame({"gross": gross, "cost": costs, "traded": traded, "net": gross - costs, "exposure": exposure})


def performance(book: pd.DataFrame, annualization: float) -> dict[str, float]:
    """Metrics of a ``simulate`` result; the win rate counts bars with a position that made money after costs."""
    net = book["net"]
    exposed = book["exposure"].gt(0)
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


def garch_positions(closes: pd.Series, test_start: pd.Timestamp, max_leverage: float = 2.0) -> pd.Series:
    """Long, scaled to the pre-test volatility with one-bar-ahead GARCH(1,1)-t forecasts fitted before ``test_start``
    (:func:`~hf_kvtrade.evaluation.fit_garch_t`), so the rule is fully invested on average."""
    from .evaluation import fit_garch_t

    log_returns = np.log(closes).diff().dropna()
    num_fit = int((log_returns.index < test_start).sum())
    if num_fit < 100:
        raise ValueError(f"GARCH needs at least 100 bars before the test period, got {num_fit}")
    # The positions do not depend on the unit of the returns: standardised ones suit arch's optimiser.
    returns = log_returns / log_returns.iloc[:num_fit].std()
    _, filtered = fit_garch_t(returns, num_fit)
    # Row t of the forecast is the variance of bar t+1 given returns up to t.
    next_variance = filtered.forecast(horizon=1, start=0, reindex=True).variance["h.1"].shift(1)
    positions = (returns.iloc[:num_fit].std() / np.sqrt(next_variance)).clip(upper=max_leverage)
    return positions.reindex(closes.index).fillna(0.0)


# -------------------------------------------------------------------------------------------- walk-forward
def stream_forecasts(engine: StreamingForecaster, symbol: str, history: pd.Series, test: pd.Series, progress=None):
    """Primes ``symbol`` on ``history`` in one prefill, then feeds ``test`` bar by bar through the engine. Returns,
    per test bar, the forecast made at its close for the next bar, with its CDF (``pit``) and CRPS at the realised
    next log-return (NaN on the last bar)."""
    engine.prime(symbol, history.to_numpy())
    rows, pit, crps, previous = [], [], [], None
    for timestamp, close in test.items():
        tick = engine.update(symbol, {"close": close, "timestamp": timestamp})
        if previous is not None:
            realised = np.log(close / previous.forecast.last_price)
            pit.append(float(previous.distribution.cdf(realised)))
            crps.append(float(previous.distribution.crps(realised)))
        rows.append((tick.prob_up, tick.mean_return, float(tick.distribution.std()), int(tick.signal)))
        previous = tick
        if progress is not None:
            progress.update(1)
    forecasts = pd.DataFrame(rows, index=test.index, columns=["prob_up", "mean_return", "std_return", "signal"])
    return forecasts.assign(pit=[*pit, np.nan], crps=[*crps, np.nan])


def forecast_quality(forecasts: pd.DataFrame) -> dict[str, float]:
    """Calibration of the streamed forecasts: PIT uniformity (KS test), CRPS and the hit rate of P(up) > 1/2."""
    scored = forecasts.dropna(subset=["pit"])
    ks = stats.kstest(scored.pit.to_numpy(), "uniform")
    return {
        "forecasts": len(scored),
        "mean_crps": float(scored.crps.mean()),
        "pit_ks_statistic": float(ks.statistic),
        "pit_ks_pvalue": float(ks.pvalue),
        "direction_hit_rate": float(((scored.prob_up > 0.5) == scored.went_up).mean()),
        "mean_prob_up": float(forecasts.prob_up.mean()),
    }


def _trade(positions: dict, asset_returns, transaction_cost: float, test) -> dict:
    """Books and metrics of every strategy in ``positions`` over the test bars."""
    books = {name: simulate(position, asset_returns, transaction_cost) for name, position in positions.items()}
    annualization = periods_per_year(test.index)
    return {
        "books": books,
        "metrics": {name: performance(book, annualization) for name, book in books.items()},
        "annualization": annualization,
        "test_start": str(test.index[0]),
        "test_end": str(test.index[-1]),
        "bars": len(asset_returns),
    }


def backtest_series(
    engine: StreamingForecaster,
    symbol: str,
    closes: pd.Series,
    test_start: pd.Timestamp,
    rule: SignalRule,
    vol_rule: VolTargetRule,
    warmup: int,
    progress=None,
    momentum_lookback: int = 20,
) -> dict:
    """All single-asset strategies over the test bars of one series; ``vol_rule`` without a target of its own aims
    at :func:`pretest_volatility`."""
    history = closes[closes.index < test_start].iloc[-warmup:]
    test = closes[closes.index >= test_start]
    if len(test) < 3:
        raise ValueError(f"{symbol}: the test period has {len(test)} bars; need at least 3")
    forecasts = stream_forecasts(engine, symbol, history, test, progress)
    forecasts["went_up"] = np.log(test).diff().shift(-1) > 0
    vol_target = vol_rule.target_vol or pretest_volatility(closes, test_start)
    vol_targeted = vol_rule.position(forecasts.prob_up.to_numpy(), forecasts.std_return.to_numpy(), vol_target)
    # Bar t of the evaluation runs from test close t-1 to test close t.
    asset_returns = test.pct_change().iloc[1:]
    positions = {
        "model": forecasts.signal.shift(1).iloc[1:].astype(float),
        "model_vol_target": pd.Series(vol_targeted, index=forecasts.index).shift(1).iloc[1:],
        "buy_and_hold": pd.Series(1.0, index=asset_returns.index),
        "flat": pd.Series(0.0, index=asset_returns.index),
        "momentum": momentum_positions(closes, momentum_lookback, rule.allow_short).reindex(asset_returns.index),
        "garch_vol_scaled": garch_positions(closes, test_start).reindex(asset_returns.index),
    }
    result = _trade(positions, asset_returns, rule.transaction_cost, test)
    return {**result, "forecasts": forecasts, "quality": forecast_quality(forecasts), "vol_target": vol_target}


def allocation_weights(mean_return: pd.DataFrame, std_return: pd.DataFrame, long_only: bool) -> pd.DataFrame:
    """Weights proportional to each asset's forecast Kelly fraction (mean / variance), gross exposure at most 1;
    long-only keeps the positive fractions, and cash when none is positive."""
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
    progress=None,
) -> dict:
    """Forecast-driven allocations (long-only and long-short) against equal weight, over shared test bars: each
    bar's closes of every asset go through one batched ``update_many`` step before the next bar's weights are set."""
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
    weights = {
        "long_only": allocation_weights(mean_return, std_return, long_only=True).shift(1).iloc[1:],
        "long_short": allocation_weights(mean_return, std_return, long_only=False).shift(1).iloc[1:],
        "equal_weight": pd.DataFrame(1.0 / test.shape[1], index=asset_returns.index, columns=test.columns),
    }
    return {**_trade(weights, asset_returns, rule.transaction_cost, test), "symbols": list(test.columns)}


# ------------------------------------------------------------------------------------------------ full run
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
    """Backtests every series in ``series`` and the book of ``portfolio`` on their test periods; writes
    ``report.json`` and PNG plots into ``out_dir`` and returns the report. ``vol_rule`` defaults to ``rule``'s
    costs and shorting, aimed at each series' pre-test volatility."""
    import json

    from . import plots
    from .data import load_series

    if warmup < 2:
        raise ValueError(f"warmup must be at least 2 bars, got {warmup}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    closes = {name: load_series(name)["close"] for name in dict.fromkeys(series + portfolio)}
    starts = {name: split_periods(close.to_frame("close"))[2].index[0] for name, close in closes.items()}
    if limit is not None:
        # Keep only the first ``limit`` test bars (plus everything before them, for warm-up and GARCH).
        closes = {name: close[: close.index.searchsorted(starts[name]) + limit + 1] for name, close in closes.items()}
    total_ticks = sum(int((closes[name].index >= starts[name]).sum()) for name in series)
    if portfolio:  # `--portfolio` with no names trades the series only
        portfolio_closes = pd.concat({name: closes[name] for name in portfolio}, axis=1, join="inner").dropna()
        portfolio_start = max(starts[name] for name in portfolio)
        total_ticks += int((portfolio_closes.index >= portfolio_start).sum()) * len(portfolio)

    vol_rule = vol_rule or VolTargetRule(transaction_cost=rule.transaction_cost, allow_short=rule.allow_short)
    engine = StreamingForecaster(model, tokenizer, cache_policy=cache_policy, signal_rule=rule)
    report = {
        "model": model_description,
        "cache_policy": cache_policy,
        "signal_rule": asdict(rule),
        "vol_target_rule": asdict(vol_rule),
        "warmup_bars": warmup,
        "series": {},
        "plots": [],
    }

    with tqdm(total=total_ticks, desc="backtest", unit="tick") as progress:
        for name in series:
            result = backtest_series(engine, name, closes[name], starts[name], rule, vol_rule, warmup, progress)
            report["series"][name] = {
                key: result[key]
                for key in ("test_start", "test_end", "bars", "annualization", "vol_target", "metrics", "quality")
            }
            report["plots"] += plots.plot_books(result["books"], out_dir, name, name, f"{name} drawdowns")
            scored = result["forecasts"].dropna(subset=["pit"])
            path = out_dir / f"calibration_{name}.png"
            report["plots"].append(plots.plot_calibration(scored, path, f"{name} forecast calibration"))
        if portfolio:
            result = backtest_portfolio(engine, portfolio_closes, portfolio_start, rule, warmup, progress=progress)
            keys = ("symbols", "test_start", "test_end", "bars", "metrics")
            report["multi_asset"] = {key: result[key] for key in keys}
            titles = "multi-asset allocations", "multi-asset drawdowns"
            report["plots"] += plots.plot_books(result["books"], out_dir, "portfolio", *titles)
    report["latency"] = engine.latency_stats()
    report["plots"].append(plots.plot_latency_histogram(engine.latencies_ms, out_dir / "latency.png"))
    report["plots"] = [Path(path).name for path in report["plots"]]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report
