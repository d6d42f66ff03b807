"""PNG plots of a backtest, drawn with matplotlib's Agg backend (no display needed): equity curves, drawdowns,
per-tick latency and forecast calibration. Every function returns the path (or paths) it wrote."""

from __future__ import annotations

from pathlib import Path

import empyrical
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(figure, path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


def plot_books(books: dict[str, pd.DataFrame], out_dir: Path, stem: str, title: str, drawdown_title: str) -> list[str]:
    """``equity_{stem}.png``, the growth of one unit of equity for each strategy's book (net returns), and
    ``drawdown_{stem}.png``, the distance of each equity curve below its running peak."""
    equity = {name: 1.0 + empyrical.cum_returns(book["net"]) for name, book in books.items()}
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for name, curve in equity.items():
        axis.plot(curve.index, curve, label=name, linewidth=2.0 if name == "model" else 1.0)
    axis.set_title(title)
    axis.set_ylabel("equity (start = 1)")
    axis.axhline(1.0, color="grey", linewidth=0.5)
    axis.legend(loc="best", fontsize=8)
    paths = [_save(figure, out_dir / f"equity_{stem}.png")]
    figure, axis = plt.subplots(figsize=(9, 3.5))
    for name, curve in equity.items():
        axis.plot(curve.index, curve / curve.cummax() - 1.0, label=name, linewidth=1.0)
    axis.set_title(drawdown_title)
    axis.set_ylabel("drawdown")
    axis.legend(loc="lower left", fontsize=8)
    return [*paths, _save(figure, out_dir / f"drawdown_{stem}.png")]


def plot_latency_histogram(latencies_ms: np.ndarray, path, title: str = "per-tick latency") -> str:
    figure, axis = plt.subplots(figsize=(7, 3.5))
    latencies_ms = np.asarray(latencies_ms)
    upper = np.percentile(latencies_ms, 99.5)
    axis.hist(np.clip(latencies_ms, None, upper), bins=60, color="tab:blue")
    for level, style in ((50, "-"), (99, "--")):
        value = np.percentile(latencies_ms, level)
        axis.axvline(value, color="black", linestyle=style, label=f"p{level} = {value:.2f} ms")
    axis.set_title(f"{title} ({len(latencies_ms)} ticks)")
    axis.set_xlabel("milliseconds")
    axis.legend()
    return _save(figure, path)


def plot_calibration(forecasts: pd.DataFrame, path, title: str) -> str:
    """Left: PIT histogram (flat when calibrated). Right: observed frequency of up moves per decile of P(up).

    ``forecasts`` has a row per scored forecast: its ``pit``, its ``prob_up`` and whether the price ``went_up``.
    """
    figure, (pit_axis, reliability_axis) = plt.subplots(1, 2, figsize=(10, 4))
    pit_axis.hist(forecasts.pit.to_numpy(), bins=20, range=(0, 1), density=True, color="tab:green")
    pit_axis.axhline(1.0, color="black", linewidth=1)
    pit_axis.set_title("PIT of realised returns")
    pit_axis.set_xlabel("forecast CDF at the outcome")

    edges = np.quantile(forecasts.prob_up, np.linspace(0, 1, 11))
    deciles = np.clip(np.searchsorted(edges, forecasts.prob_up, side="right") - 1, 0, 9)
    means = forecasts.groupby(deciles)[["prob_up", "went_up"]].mean()
    predicted, observed = means.prob_up.tolist(), means.went_up.tolist()
    reliability_axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    reliability_axis.plot(predicted, observed, marker="o")
    low, high = min(predicted + observed), max(predicted + observed)
    reliability_axis.set_xlim(low - 0.05, high + 0.05)
    reliability_axis.set_ylim(low - 0.05, high + 0.05)
    reliability_axis.set_title("P(up) reliability (deciles)")
    reliability_axis.set_xlabel("forecast P(up)")
    reliability_axis.set_ylabel("observed frequency")
    figure.suptitle(title)
    return _save(figure, path)
