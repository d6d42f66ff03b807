"""The order-book model against simple baselines, on the same ticks and the same move bins (docs/orderbook.md).

Every forecaster gives, after tick ``t - 1``, a distribution over the move bins of tick ``t``; scored ticks are those
with a known move. ``nll`` is the mean negative log-likelihood (nats) of the observed bin, ``nll_moves`` the same
over the ticks where the mid moved, ``direction_accuracy`` how often ``sign(P(up) - P(down))`` is the sign of a move
(a tie counts as wrong). The baselines are fitted on the training period only: ``no change`` (the training
period's bin frequencies), and multinomial logistic regressions of the bin on the depth imbalance over the top 1,
5 and 20 levels and on the tick's OFI (a logit linear in OFI, after Cont, Kukanov & Stoikov).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..context import ContextPolicy
from ..data.windows import IGNORE_INDEX
from .tokenizer import OrderBookTokenizer
from .training import scoring_windows, split_by_time

IMBALANCE_COLUMNS = ("imbalance_1", "imbalance_5", "imbalance_20")


def move_targets(frame: pd.DataFrame, tokenizer: OrderBookTokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(ticks, bins)``: the ticks with a known move (the move from the tick before) and the move's bin."""
    moves = frame["mid"].diff().to_numpy()
    ticks = np.flatnonzero(np.isfinite(moves))
    return ticks, tokenizer.move_bins(moves[ticks])


def model_move_probs(model, tokenizer: OrderBookTokenizer, ids: np.ndarray, first_tick: int, end_tick: int) -> np.ndarray:
    """The model's move distribution for every scored tick in ``first_tick .. end_tick - 1``, each from the context the
    policy gives it (one full forward per window, no cache)."""
    import torch

    policy = ContextPolicy.from_config(model.config)
    input_ids, labels = scoring_windows(ids, tokenizer, policy, first_tick, end_tick)
    rows = []
    with torch.inference_mode():
        for window, window_labels in zip(input_ids, labels):
            logits = model(input_ids=torch.as_tensor(window)[None]).logits[0].float().numpy()
            scored = np.flatnonzero(window_labels != IGNORE_INDEX)
            rows.append(tokenizer.move_distribution(logits[scored - 1]))
    return np.concatenate(rows) if rows else np.empty((0, tokenizer.num_move_bins))


def baseline_move_probs(frame: pd.DataFrame, tokenizer: OrderBookTokenizer, ticks: np.ndarray, train_end: int) -> dict[str, np.ndarray]:
    """Each baseline's move distribution for ``ticks``, fitted on the scored ticks before ``train_end``."""
    from sklearn.linear_model import LogisticRegression

    all_ticks, all_bins = move_targets(frame, tokenizer)
    train = all_ticks < train_end
    train_ticks, train_bins = all_ticks[train], all_bins[train]
    if missing := sorted(set(range(tokenizer.num_move_bins)) - set(train_bins.tolist())):
        raise ValueError(f"move bins {missing} never occur in the training period: a baseline cannot give them mass")
    frequencies = np.bincount(train_bins, minlength=tokenizer.num_move_bins) / len(train_bins)
    inputs = {"depth imbalance (logistic)": list(IMBALANCE_COLUMNS), "OFI (linear logit)": ["ofi"]}
    probs = {"no change": np.tile(frequencies, (len(ticks), 1))}
    for name, columns in inputs.items():
        values = frame[columns].to_numpy()
        fitted = LogisticRegression(max_iter=2000).fit(values[train_ticks - 1], train_bins)
        probs[name] = fitted.predict_proba(values[ticks - 1])
    return probs


def move_metrics(probs: np.ndarray, bins: np.ndarray, tokenizer: OrderBookTokenizer) -> dict[str, float]:
    """``nll``, ``nll_moves`` and ``direction_accuracy`` (see the module docstring) and the counts they rest on."""
    likelihood = probs[np.arange(len(bins)), bins]
    steps = tokenizer.move_steps[bins]
    moved = steps != 0
    up, down = probs[:, tokenizer.move_steps > 0].sum(1), probs[:, tokenizer.move_steps < 0].sum(1)
    called = np.sign(up - down)
    return {
        "ticks": len(bins),
        "moves": int(moved.sum()),
        "nll": float(-np.log(likelihood).mean()),
        "nll_moves": float(-np.log(likelihood[moved]).mean()) if moved.any() else float("nan"),
        "direction_accuracy": float((called[moved] == np.sign(steps[moved])).mean()) if moved.any() else float("nan"),
    }


def compare(frame: pd.DataFrame, model, tokenizer: OrderBookTokenizer) -> dict[str, dict[str, dict[str, float]]]:
    """``{period: {forecaster: metrics}}`` for the validation and test periods of ``frame``."""
    validation_start, test_start = split_by_time(frame)
    ids = tokenizer.encode(frame)
    ticks, bins = move_targets(frame, tokenizer)
    report = {}
    for period, (first, end) in {"validation": (validation_start, test_start), "test": (test_start, len(frame))}.items():
        chosen = (ticks >= first) & (ticks < end)
        forecasts = {"kvtrade-orderbook": model_move_probs(model, tokenizer, ids, first, end),
                     **baseline_move_probs(frame, tokenizer, ticks[chosen], validation_start)}  # fmt: skip
        report[period] = {name: move_metrics(probs, bins[chosen], tokenizer) for name, probs in forecasts.items()}
    return report


def format_report(report: dict) -> str:
    """The comparison as a Markdown table."""
    lines = ["| period | forecaster | ticks | moves | NLL (nats/tick) | NLL on moves | direction accuracy |", "|---|---|---|---|---|---|---|"]
    for period, rows in report.items():
        for name, row in rows.items():
            lines.append(f"| {period} | {name} | {row['ticks']:,} | {row['moves']} | {row['nll']:.4f} | {row['nll_moves']:.3f} "
                         f"| {row['direction_accuracy']:.1%} ({round(row['direction_accuracy'] * row['moves'])}/{row['moves']}) |")  # fmt: skip
    return "\n".join(lines)


__all__ = ["baseline_move_probs", "compare", "format_report", "model_move_probs", "move_metrics", "move_targets"]
