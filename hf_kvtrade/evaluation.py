"""Next-bar forecast evaluation: the model and three baselines scored by the same code on held-out bars.

Every forecast (the model's :class:`BinnedDistribution`, a :class:`GaussianForecast` or a :class:`StudentTForecast`)
has ``log_density``, ``crps``, ``quantile``, ``prob_up`` and ``cdf``; :func:`score` turns any of them into metrics.
Baselines are fitted on the bars before the test period and each forecast conditions on earlier bars only; the
metrics, baselines and the held-out rule of :func:`heldout_series_names` are described in docs/data.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special, stats

from .context import ContextPolicy
from .data.windows import split_periods, tokenize_period
from .distribution import BinnedDistribution

MODEL_NAMES = ("kvtrade", "random_walk", "garch_t", "unconditional")
METRICS = ("nll", "crps", "coverage_50", "coverage_90", "direction_acc", "pit_distance")
INTERVAL_LEVELS = (0.05, 0.25, 0.75, 0.95)
PIT_BINS = 10
# The targets of a forecaster worth trading (issue "A forecaster worth trading"): the aggregate NLL at least
# GARCH-t's, and on every series NLL below the random walk's and the unconditional t's, with calibrated intervals.
COVERAGE_TARGETS = {"coverage_50": (0.45, 0.55), "coverage_90": (0.87, 0.93)}


@dataclass
class GaussianForecast:
    """Normal next-bar returns with per-bar ``mean`` and ``std``."""

    mean: np.ndarray
    std: np.ndarray

    def log_density(self, x) -> np.ndarray:
        return stats.norm.logpdf(x, self.mean, self.std)

    def crps(self, x) -> np.ndarray:
        # Closed form (Gneiting & Raftery 2007): sigma * [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)].
        z = (np.asarray(x) - self.mean) / self.std
        return self.std * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))

    def quantile(self, levels) -> np.ndarray:
        return stats.norm.ppf(np.asarray(levels), np.asarray(self.mean)[..., None], np.asarray(self.std)[..., None])

    def prob_up(self) -> np.ndarray:
        return stats.norm.sf(0.0, self.mean, self.std)

    def cdf(self, x) -> np.ndarray:
        return stats.norm.cdf(x, self.mean, self.std)


@dataclass
class StudentTForecast:
    """Student-t next-bar returns with location ``loc``, scale ``scale`` (not the std) and ``df`` > 1."""

    loc: np.ndarray
    scale: np.ndarray
    df: float

    def log_density(self, x) -> np.ndarray:
        return stats.t.logpdf(x, self.df, self.loc, self.scale)

    def crps(self, x) -> np.ndarray:
        # Closed form for the location-scale t (Thorarinsdottir & Gneiting 2010), valid for df > 1.
        nu = self.df
        z = (np.asarray(x) - self.loc) / self.scale
        tail = 2 * np.sqrt(nu) * special.beta(0.5, nu - 0.5) / ((nu - 1) * special.beta(0.5, nu / 2) ** 2)
        body = z * (2 * stats.t.cdf(z, nu) - 1) + 2 * stats.t.pdf(z, nu) * (nu + z**2) / (nu - 1)
        return self.scale * (body - tail)

    def quantile(self, levels) -> np.ndarray:
        loc, scale = np.asarray(self.loc)[..., None], np.asarray(self.scale)[..., None]
        return stats.t.ppf(np.asarray(levels), self.df, loc, scale)

    def prob_up(self) -> np.ndarray:
        return stats.t.sf(0.0, self.df, self.loc, self.scale)

    def cdf(self, x) -> np.ndarray:
        return stats.t.cdf(x, self.df, self.loc, self.scale)


def score(forecast, returns: np.ndarray) -> dict:
    """Per-bar means of :data:`METRICS` for one model's forecasts of the observed log-``returns``."""
    return summarize(per_bar_scores(forecast, np.asarray(returns, dtype=np.float64)))


# ------------------------------------------------------------------------------------------------- baselines
def random_walk_forecast(returns: np.ndarray, test_start: int, volatility_window: int = 20) -> GaussianForecast:
    """Forecasts for ``returns[test_start:]``, each from the ``volatility_window`` returns before it."""
    if test_start < volatility_window:
        raise ValueError(f"need {volatility_window} returns before the test period, got {test_start}")
    rolling_std = pd.Series(returns).rolling(volatility_window).std().shift(1).to_numpy()[test_start:]
    # Flat stretches (a price that did not move for a whole window) would give a zero-width distribution.
    floor = np.std(returns[:test_start]) * 1e-2
    mean = np.full(len(returns) - test_start, np.mean(returns[:test_start]))
    return GaussianForecast(mean=mean, std=np.maximum(rolling_std, floor))


def fit_garch_t(returns, num_fit: int):
    """``(params, filtered)``: GARCH(1,1)-t with a constant mean fitted on ``returns[:num_fit]`` (scaled by the caller
    to order one, for arch's optimiser), then filtered with those fixed parameters, so each volatility is causal."""
    from arch import arch_model

    specification = dict(mean="Constant", vol="GARCH", p=1, q=1, dist="t", rescale=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter; a failed fit shows up in the scores
        params = arch_model(returns[:num_fit], **specification).fit(disp="off").params
    return params, arch_model(returns, **specification).fix(params)


def garch_t_forecast(returns: np.ndarray, test_start: int) -> StudentTForecast:
    params, filtered = fit_garch_t(100.0 * returns, test_start)  # in percent, as arch recommends
    nu = float(params["nu"])
    # arch's t has unit variance: its scale parameter is std * sqrt((nu - 2) / nu).
    std = filtered.conditional_volatility[test_start:] / 100.0
    loc = np.full(len(std), params["mu"] / 100.0)
    return StudentTForecast(loc=loc, scale=std * np.sqrt((nu - 2) / nu), df=nu)


def unconditional_forecast(returns: np.ndarray, test_start: int) -> StudentTForecast:
    df, loc, scale = stats.t.fit(returns[:test_start])
    count = len(returns) - test_start
    return StudentTForecast(loc=np.full(count, loc), scale=np.full(count, scale), df=max(df, 1.01))


# ------------------------------------------------------------------------------------------------- the model
def model_forecast(
    model, tokenizer, ids: np.ndarray, first_target: int, context_policy: ContextPolicy, batch_size: int = 16
):
    """``BinnedDistribution`` of ``ids[k]`` for every ``k >= first_target``, KV-cache free and batched.

    Each target conditions on the tokens ``context_policy`` gives a history of ``k`` tokens, the context every
    serving path uses; one forward pass over a policy window scores all the targets that share its anchor.
    """
    import torch

    probs = np.empty((len(ids) - first_target, tokenizer.num_bins))
    windows = context_policy.scoring_windows(len(ids), first_target)
    # Windows of equal length batch together; only the first and the last can be shorter.
    for length in sorted({end - start for start, end, _ in windows}):
        group = [window for window in windows if window[1] - window[0] == length]
        for batch_start in range(0, len(group), batch_size):
            batch = group[batch_start : batch_start + batch_size]
            input_ids = torch.as_tensor(np.stack([ids[start : end - 1] for start, end, _ in batch]))
            with torch.inference_mode():
                logits = model(input_ids=input_ids).logits.float()
            token_probs = torch.softmax(logits, dim=-1)[..., tokenizer.first_bin_id :].numpy()
            for row, (start, end, first_scored) in enumerate(batch):
                probs[first_scored - first_target : end - first_target] = token_probs[row, first_scored - start - 1 :]
    return BinnedDistribution(probs, tokenizer.bin_edges)


def returns_and_test_start(frame: pd.DataFrame) -> tuple[np.ndarray, int]:
    """``(returns, test_start)``: every close-to-close log-return of ``frame`` and the index of the first one that
    ends on a test-period bar. ``returns[k]`` ends on bar ``k + 1`` and is token ``k + 1`` of the series."""
    _, _, test = split_periods(frame)
    return np.diff(np.log(frame["close"].to_numpy())), len(frame) - len(test) - 1


def evaluate_series(frame: pd.DataFrame, model=None, tokenizer=None, volatility_window: int = 20):
    """``(per-bar scores of every model, target returns)`` on the test period of one series.

    Context may reach back into the training and validation periods: that is the past, not look-ahead.
    """
    returns, test_start = returns_and_test_start(frame)
    target = returns[test_start:]
    forecasts = {
        "random_walk": random_walk_forecast(returns, test_start, volatility_window),
        "garch_t": garch_t_forecast(returns, test_start),
        "unconditional": unconditional_forecast(returns, test_start),
    }
    if model is not None:
        ids = tokenize_period(frame, tokenizer)  # ids[k + 1] is the token of returns[k]
        policy = ContextPolicy.from_config(model.config)
        forecasts = {"kvtrade": model_forecast(model, tokenizer, ids, test_start + 1, policy), **forecasts}
    return {name: per_bar_scores(forecast, target) for name, forecast in forecasts.items()}, target


def per_bar_scores(forecast, returns: np.ndarray) -> dict[str, np.ndarray]:
    """The per-bar terms whose means are :func:`score`'s metrics, so series can be pooled bar by bar."""
    q05, q25, q75, q95 = np.moveaxis(forecast.quantile(INTERVAL_LEVELS), -1, 0)
    return {
        "nll": -forecast.log_density(returns),
        "crps": forecast.crps(returns),
        "coverage_50": (returns >= q25) & (returns <= q75),
        "coverage_90": (returns >= q05) & (returns <= q95),
        "direction_acc": (forecast.prob_up() > 0.5) == (returns > 0),
        "pit": forecast.cdf(returns),
    }


def summarize(terms: dict[str, np.ndarray]) -> dict[str, float]:
    """Means of the per-bar metrics, and the share of bars that would have to move to flatten the PIT histogram."""
    summary = {metric: float(np.mean(values)) for metric, values in terms.items() if metric != "pit"}
    counts, _ = np.histogram(terms["pit"], bins=PIT_BINS, range=(0.0, 1.0))
    summary["pit_distance"] = float(0.5 * np.abs(counts / max(len(terms["pit"]), 1) - 1.0 / PIT_BINS).sum())
    return summary


def evaluate(frames: dict[str, pd.DataFrame], model=None, tokenizer=None) -> dict:
    """Pooled (every test bar of every series weighs the same) and per-series metrics, as a JSON-ready dict."""
    scored = [evaluate_series(frame, model, tokenizer)[0] for frame in frames.values()]
    pooled = {
        name: {metric: np.concatenate([bars[name][metric] for bars in scored]) for metric in terms}
        for name, terms in scored[0].items()
    }
    results = {
        "num_bars": len(pooled["random_walk"]["nll"]),
        "context_policy": None if model is None else vars(ContextPolicy.from_config(model.config)),
        "models": {name: summarize(terms) for name, terms in pooled.items()},
        "series": {
            name: {"num_bars": len(bars["random_walk"]["nll"]), "models": {m: summarize(t) for m, t in bars.items()}}
            for name, bars in zip(frames, scored)
        },
    }
    if model is not None:
        results["targets"] = check_targets(results)
    return results


def check_targets(results: dict, model_name: str = "kvtrade") -> dict:
    """Which targets (see :data:`COVERAGE_TARGETS`) ``model_name`` meets, each a bool:
    ``{"aggregate": {...}, "series": {name: {...}}}``."""

    def checks(models: dict) -> dict:
        mine = models[model_name]
        return {
            "nll_vs_random_walk": mine["nll"] < models["random_walk"]["nll"],
            "nll_vs_unconditional": mine["nll"] < models["unconditional"]["nll"],
            **{metric: low <= mine[metric] <= high for metric, (low, high) in COVERAGE_TARGETS.items()},
        }

    aggregate = results["models"]
    return {
        "aggregate": {"nll_vs_garch_t": aggregate[model_name]["nll"] <= aggregate["garch_t"]["nll"]},
        "series": {name: checks(entry["models"]) for name, entry in results["series"].items()},
    }


def tokenized_series(frames: dict[str, pd.DataFrame], tokenizer) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """``(ids, returns, test_start)`` of every series: its tokens and :func:`returns_and_test_start`'s answer."""
    return [(tokenize_period(frame, tokenizer), *returns_and_test_start(frame)) for frame in frames.values()]


def pooled_model_nll(series, model, tokenizer, policy: ContextPolicy | None = None) -> float:
    """The model's test-period NLL pooled over every bar of ``series`` (from :func:`tokenized_series`) under
    ``policy``; with the checkpoint's own policy (the default) it is :func:`evaluate`'s ``kvtrade`` NLL."""
    policy = policy or ContextPolicy.from_config(model.config)
    values = [
        -model_forecast(model, tokenizer, ids, test_start + 1, policy).log_density(returns[test_start:])
        for ids, returns, test_start in series
    ]
    return float(np.mean(np.concatenate(values)))


def context_length_curve(frames: dict[str, pd.DataFrame], model, tokenizer, lengths) -> dict[int, float]:
    """Pooled test-period NLL of the model under a policy window of each length in ``lengths`` (stride half of it).

    Lengths beyond the checkpoint's own window would put positions the model never learned, so they are refused.
    """
    window = ContextPolicy.from_config(model.config).window
    if any(length > window or length < 4 for length in lengths):
        raise ValueError(f"context lengths must lie in [4, {window}] (the checkpoint's window), got {list(lengths)}")
    series = tokenized_series(frames, tokenizer)
    return {
        length: pooled_model_nll(series, model, tokenizer, ContextPolicy(window=length, stride=length // 2))
        for length in lengths
    }


def heldout_series_names(frames: dict[str, pd.DataFrame], markets: dict[str, str] | None = None) -> list[str]:
    """Series whose test period begins after the training period of every peer has ended.

    Peers share a bar frequency and, when ``markets`` names them (equity, fx, crypto...), a market: a crypto
    series trained into 2019 says little about the S&P 500 in 2017, but another listing of the same stocks would.
    """
    markets = markets or {}
    periods = {name: split_periods(frame) for name, frame in frames.items()}
    peers = {name: (frame.index.to_series().diff().median(), markets.get(name)) for name, frame in frames.items()}
    return [
        name
        for name, (_, _, test) in periods.items()
        if all(periods[other][0].index[-1] < test.index[0] for other in frames if peers[other] == peers[name])
    ]


# ------------------------------------------------------------------------------------------------- tables
def _mark(met: bool) -> str:
    return "met" if met else "MISSED"


def _missed(checks: dict[str, bool]) -> list[str]:
    return [target for target, met in checks.items() if not met]


def _target_counts(targets: dict) -> dict[str, tuple[int, int]]:
    """Per-series target -> (series meeting it, series)."""
    met = pd.DataFrame(targets["series"]).sum(axis=1)
    return {target: (int(count), len(targets["series"])) for target, count in met.items()}


def _aggregate_line(results: dict) -> str:
    nll = {name: results["models"][name]["nll"] for name in ("kvtrade", "garch_t")}
    return f"{_mark(results['targets']['aggregate']['nll_vs_garch_t'])} ({nll['kvtrade']:.4f} vs {nll['garch_t']:.4f})"


# Text columns of the per-series table after the series name, with their widths.
SERIES_COLUMNS = {"bars": 6, "kvtrade": 9, "rw": 9, "garch_t": 9, "uncond": 9, "cov50": 7, "cov90": 7, "pit": 6}


def _series_cells(entry: dict) -> list[str]:
    """A series' bars, every model's NLL, and the model's interval coverages and PIT distance, formatted."""
    models = entry["models"]
    return [
        str(entry["num_bars"]),
        *(f"{models[name]['nll']:.4f}" for name in MODEL_NAMES),
        *(f"{models['kvtrade'][metric]:.3f}" for metric in ("coverage_50", "coverage_90", "pit_distance")),
    ]


def format_table(results: dict) -> str:
    """The pooled table of every model; with a model, also its per-series table with each target met or missed."""
    lines = [f"test period: {results['num_bars']} bars", f"{'model':<14}" + "".join(f"{m:>14}" for m in METRICS)]
    lines += [
        f"{name:<14}" + "".join(f"{metrics[metric]:>14.6f}" for metric in METRICS)
        for name, metrics in results["models"].items()
    ]
    if "targets" not in results:
        return "\n".join(lines)
    titles = "".join(title.rjust(width) for title, width in SERIES_COLUMNS.items())
    lines += ["", f"{'series':<22}{titles}  targets"]
    for name, entry in results["series"].items():
        cells = "".join(cell.rjust(width) for cell, width in zip(_series_cells(entry), SERIES_COLUMNS.values()))
        missed = _missed(results["targets"]["series"][name])
        lines.append(f"{name:<22}{cells}  {'MISSED ' + ', '.join(missed) if missed else 'all met'}")
    for target, (met, total) in _target_counts(results["targets"]).items():
        lines.append(f"target {target} on every series: {_mark(met == total)} ({met}/{total})")
    lines.append(f"target aggregate NLL <= garch_t: {_aggregate_line(results)}")
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])


def markdown_tables(results: dict) -> str:
    """The pooled table, the per-series table with targets, and the context-length curve, in Markdown."""
    pooled = [
        [name, f"{m['nll']:.4f}", f"{m['crps']:.6f}", *(f"{m[metric]:.3f}" for metric in METRICS[2:])]
        for name, m in results["models"].items()
    ]
    header = ["model", "NLL", "CRPS", "coverage 50%", "coverage 90%", "direction", "PIT distance"]
    parts = [_markdown_table(header, pooled)]
    if "targets" in results:
        targets = results["targets"]
        rows = []
        for name, entry in results["series"].items():
            missed = _missed(targets["series"][name])
            rows.append([name, *_series_cells(entry), "missed: " + ", ".join(missed) if missed else "all met"])
        header = ["series", "bars", "kvtrade NLL", "random walk", "GARCH-t", "unconditional t", "cov 50%", "cov 90%"]
        parts.append(_markdown_table([*header, "PIT distance", "targets"], rows))
        summary = [f"- {target}: {met}/{total} series" for target, (met, total) in _target_counts(targets).items()]
        summary.append(f"- aggregate NLL <= GARCH-t: {_aggregate_line(results)}")
        parts.append("Targets met:\n\n" + "\n".join(summary))
    if "context_length_nll" in results:
        curve = results["context_length_nll"]
        table = _markdown_table(["window", *map(str, curve)], [["NLL", *(f"{nll:.4f}" for nll in curve.values())]])
        parts.append("Pooled model NLL by policy window (stride half the window, so contexts span half a window to a "
                     f"whole one):\n\n{table}")
    return "\n\n".join(parts)


EVALUATION_HEADING = "## Test-period evaluation"


def update_model_card(checkpoint, results: dict, command: str):
    """Replaces (or adds) the evaluation section of the checkpoint's ``README.md`` model card."""
    from huggingface_hub import ModelCard

    path = Path(checkpoint) / "README.md"
    card = ModelCard.load(path)
    text = card.text.split(EVALUATION_HEADING)[0].rstrip()
    section = (
        f"{EVALUATION_HEADING}\n\n```bash\n{command}\n```\n\n"
        f"Next-bar forecasts on {results['num_bars']} test bars of {len(results['series'])} series "
        f"({', '.join(results['series'])}), contexts by the checkpoint's policy {results['context_policy']}. "
        "NLL in nats per bar (lower is better), CRPS in log-return units (lower is better), interval coverage "
        "(ideal 0.5 and 0.9), direction accuracy, and the share of bars that would have to move to flatten the 10-bin "
        "PIT histogram (0 is calibrated). Baselines are described in docs/data.md.\n\n" + markdown_tables(results)
    )
    card.text = f"{text}\n\n{section}\n"
    card.save(path)
    return path
