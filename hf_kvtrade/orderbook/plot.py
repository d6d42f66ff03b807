"""The trader's view of a replay: mid price with the forecast band, the book's imbalance, the model's lean and trades."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .analyzer import TickForecast


def plot_orderbook_forecasts(forecasts: list[TickForecast], trades: pd.DataFrame, path: str | Path,
                             band: tuple[float, float] = (0.01, 0.99), title: str = "") -> Path:  # fmt: skip
    """Writes a three-panel PNG over the ticks of ``forecasts``.

    Top: the mid, the ``band`` quantiles of the next tick's mid as forecast one tick earlier (so the band at a tick
    is what was expected for it), and the trades as buy/sell markers at their prices. Middle: top-of-book depth
    imbalance, the model's lean given a move ``(P(up) - P(down)) / P(move)`` and, on the right axis, ``P(move)``.
    Bottom: signed traded volume per tick.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to manage

    if len(forecasts) < 2:
        raise ValueError(f"need at least two forecasts to plot, got {len(forecasts)}")
    times = pd.to_datetime([f.tick_ms for f in forecasts], unit="ms", utc=True)
    mid = np.array([f.mid for f in forecasts])
    bands = np.array([f.mid_quantiles(band) for f in forecasts])
    up, down = np.array([f.prob_up for f in forecasts]), np.array([f.prob_down for f in forecasts])
    stamps = pd.to_datetime(trades["exchange_timestamp"], unit="ms", utc=True)
    shown_times = stamps[(stamps >= times[0]) & (stamps <= times[-1])]
    shown = trades.loc[shown_times.index]

    figure = Figure(figsize=(12, 8))
    top, middle, bottom = figure.subplots(3, 1, sharex=True, height_ratios=(3, 1.4, 1))
    top.fill_between(times[1:], bands[:-1, 0], bands[:-1, 1], step="post", color="tab:blue", alpha=0.25,
                     label=f"forecast {band[0]:.0%}-{band[1]:.0%} of the tick's mid, made one tick before")  # fmt: skip
    top.step(times, mid, where="post", color="black", lw=1, label="mid")
    for side, marker, color in (("buy", "^", "tab:green"), ("sell", "v", "tab:red")):
        chosen = shown["side"].to_numpy() == side
        top.scatter(shown_times[chosen], shown["price"].to_numpy()[chosen], marker=marker, color=color, s=18, label=f"{side} trades", zorder=3)
    top.set_ylabel("mid (USD)")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title or "BTC/USD order book: next-tick mid forecast")
    middle.plot(times, [f.imbalance for f in forecasts], color="tab:purple", lw=0.8, label="depth imbalance (top level)")
    middle.plot(times, (up - down) / (up + down), color="tab:orange", lw=0.8, label="model lean if it moves: P(up) - P(down), given a move")
    middle.axhline(0, color="grey", lw=0.5)
    middle.set_ylim(-1.05, 1.05)
    middle.legend(loc="upper left", fontsize=8)
    chance = middle.twinx()
    chance.plot(times, up + down, color="tab:cyan", lw=0.8)
    chance.set_ylabel("model P(move)", color="tab:cyan")
    chance.set_ylim(bottom=0)
    flow = np.array([f.trade_flow for f in forecasts])
    # One line per tick that traded: a 100 ms bar is narrower than a pixel over minutes.
    bottom.vlines(times[flow != 0], 0, flow[flow != 0], color=np.where(flow[flow != 0] > 0, "tab:green", "tab:red"), lw=1.5)
    bottom.axhline(0, color="grey", lw=0.5)
    bottom.set_ylabel("BTC bought - sold")
    bottom.set_xlabel("time (UTC)")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


__all__ = ["plot_orderbook_forecasts"]
