"""Time splits and token windows: from price frames to the ``datasets.Dataset`` the Trainer consumes.

Every series is split by time into a train, a validation and a test period (:data:`PERIOD_FRACTIONS` of its
bars, in that order, so the test period is the final stretch). Each period is tokenized on its own and cut into
windows, so no window straddles a boundary and nothing from a later period leaks into an earlier one.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import pandas as pd

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
    train_end = int(round(len(frame) * fractions[0]))
    validation_end = int(round(len(frame) * (fractions[0] + fractions[1])))
    return frame.iloc[:train_end], frame.iloc[train_end:validation_end], frame.iloc[validation_end:]


def tokenize_period(frame: pd.DataFrame, tokenizer: ReturnTokenizer) -> np.ndarray:
    """``[bos]`` + one token per close-to-close log-return of the period."""
    with warnings.catch_warnings():
        # A few real crashes exceed the clip range; they belong in the end bins, which is what the warning says.
        warnings.filterwarnings("ignore", message=".*beyond the clip range.*")
        return tokenizer.encode(frame["close"].to_numpy(), timestamps=frame.index.asi8)


def cut_windows(
    ids: np.ndarray, window_length: int, pad_token_id: int, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``window_length`` ids starting every ``stride`` ids (default: ``window_length``, no overlap).

    The last window is right-padded, with labels -100 on the padding. Padded inputs come after every real token,
    so causal attention keeps them out of every scored position.
    """
    stride = stride or window_length
    if window_length < 2 or not 1 <= stride <= window_length:
        raise ValueError(f"need window_length >= 2 and 1 <= stride <= window_length, got {window_length}, {stride}")
    starts = np.arange(0, max(len(ids) - window_length, 0) + stride, stride)
    starts = starts[(starts == 0) | (starts + window_length - stride < len(ids))]
    padded_ids = np.concatenate([ids, np.full(window_length, pad_token_id, dtype=np.int64)])
    padded_labels = np.concatenate([ids, np.full(window_length, IGNORE_INDEX, dtype=np.int64)])
    positions = starts[:, None] + np.arange(window_length)
    return padded_ids[positions], padded_labels[positions]


def token_windows(
    frames: dict[str, pd.DataFrame] | Iterable[tuple[str, pd.DataFrame]],
    tokenizer: ReturnTokenizer,
    window_length: int,
    fractions: tuple[float, float, float] = PERIOD_FRACTIONS,
    train_stride: int | None = None,
):
    """A ``datasets.DatasetDict`` with ``train``, ``validation`` and ``test`` splits of token windows.

    Columns: ``input_ids`` and ``labels`` (equal, except -100 on padding; the model shifts them itself),
    ``series`` (its name) and ``start`` (timestamp of the window's first bar, ISO format). ``train_stride``
    below ``window_length`` overlaps the training windows, so each bar is also seen after other contexts;
    validation and test windows never overlap, so every bar is scored once.
    """
    from datasets import Dataset, DatasetDict

    items = frames.items() if isinstance(frames, dict) else frames
    columns = {period: {"input_ids": [], "labels": [], "series": [], "start": []} for period in PERIODS}
    for name, frame in items:
        for period, part in zip(PERIODS, split_periods(frame, fractions)):
            stride = train_stride if period == "train" else window_length
            input_ids, labels = cut_windows(tokenize_period(part, tokenizer), window_length, tokenizer.pad_token_id, stride)
            starts = part.index[:: stride][: len(input_ids)]
            columns[period]["input_ids"].extend(input_ids.tolist())
            columns[period]["labels"].extend(labels.tolist())
            columns[period]["series"].extend([name] * len(input_ids))
            columns[period]["start"].extend(stamp.isoformat() for stamp in starts)
    return DatasetDict({period: Dataset.from_dict(columns[period]) for period in PERIODS})
