"""Time splits and token windows: from price frames to the ``datasets.Dataset`` the Trainer consumes.

Every series is split by time into train, validation and test periods (:data:`PERIOD_FRACTIONS` of its bars, in
that order). A period's targets are the returns ending on its bars; their contexts may reach back into earlier
periods (the past, as in serving and ``evaluation``), never forward into a later one.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import pandas as pd

from ..context import ContextPolicy
from ..tokenization_kvtrade import ReturnTokenizer

PERIODS = ("train", "validation", "test")
PERIOD_FRACTIONS = (0.8, 0.1, 0.1)
IGNORE_INDEX = -100


def split_periods(frame: pd.DataFrame, fractions: tuple[float, float, float] = PERIOD_FRACTIONS):
    """``(train, validation, test)``: consecutive, non-overlapping stretches of ``frame`` by time."""
    if len(fractions) != 3 or any(fraction <= 0 for fraction in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    if not frame.index.is_monotonic_increasing:
        raise ValueError("frame must be sorted by time before it is split")
    if len(frame) < 6:
        raise ValueError(f"need at least 6 bars to split into three periods of two or more bars, got {len(frame)}")
    train_end, validation_end = (int(round(len(frame) * edge)) for edge in np.cumsum(fractions[:2]))
    return frame.iloc[:train_end], frame.iloc[train_end:validation_end], frame.iloc[validation_end:]


def tokenize_period(frame: pd.DataFrame, tokenizer: ReturnTokenizer) -> np.ndarray:
    """``[bos]`` + one token per close-to-close log-return of the period."""
    with warnings.catch_warnings():
        # A few real crashes exceed the clip range; they belong in the end bins, which is what the warning says.
        warnings.filterwarnings("ignore", message=".*beyond the clip range.*")
        return tokenizer.encode(frame["close"].to_numpy(), timestamps=frame.index.asi8)


def policy_windows(
    ids: np.ndarray, policy: ContextPolicy, pad_token_id: int, first_target: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input_ids, labels, starts)``: the windows of ``policy.scoring_windows`` over ``ids``, right-padded.

    Labels are -100 except on the tokens each window scores (``ids[first_target:]``), so training sees every token
    exactly once, forecast from exactly the context the policy gives it in serving. Padding comes after every real
    token, so causal attention keeps it out of every scored position.
    """
    windows = policy.scoring_windows(len(ids), first_target) if len(ids) > first_target else []
    input_ids = np.full((len(windows), policy.window), pad_token_id, dtype=np.int64)
    labels = np.full((len(windows), policy.window), IGNORE_INDEX, dtype=np.int64)
    for row, (start, end, first_scored) in enumerate(windows):
        input_ids[row, : end - start] = ids[start:end]
        labels[row, first_scored - start : end - start] = ids[first_scored:end]
    return input_ids, labels, np.array([start for start, _, _ in windows], dtype=np.int64)


def token_windows(
    frames: dict[str, pd.DataFrame] | Iterable[tuple[str, pd.DataFrame]],
    tokenizer: ReturnTokenizer,
    policy: ContextPolicy,
    fractions: tuple[float, float, float] = PERIOD_FRACTIONS,
):
    """A ``datasets.DatasetDict`` with ``train``, ``validation`` and ``test`` splits of :func:`policy_windows`.

    Columns: ``input_ids`` and ``labels`` (the model shifts them itself), ``series`` (its name) and ``start``
    (timestamp of the window's first bar, ISO format). In every split each bar is scored once, from the context
    the policy gives it after the whole history before it, so the validation loss is the serving next-bar loss
    and the one ``kvtrade evaluate`` reports on the test period.
    """
    from datasets import Dataset, DatasetDict

    items = frames.items() if isinstance(frames, dict) else frames
    columns = {period: {"input_ids": [], "labels": [], "series": [], "start": []} for period in PERIODS}
    for name, frame in items:
        ids = tokenize_period(frame, tokenizer)  # ids[k] is the return ending on bar k
        bounds = np.cumsum([0, *(len(part) for part in split_periods(frame, fractions))])
        for period, first_bar, end_bar in zip(PERIODS, bounds[:-1], bounds[1:]):
            first_target = max(int(first_bar), 1)
            input_ids, labels, starts = policy_windows(ids[:end_bar], policy, tokenizer.pad_token_id, first_target)
            columns[period]["input_ids"] += input_ids.tolist()
            columns[period]["labels"] += labels.tolist()
            columns[period]["series"] += [name] * len(input_ids)
            columns[period]["start"] += [stamp.isoformat() for stamp in frame.index[starts]]
    return DatasetDict({period: Dataset.from_dict(columns[period]) for period in PERIODS})
