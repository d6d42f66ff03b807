"""Stateless, prefix-stable tokens of order-book ticks: three per tick, in one vocabulary.

Tick ``t`` becomes ``[move_t, imbalance_t, ofi_t]``: the mid's move since the tick before in mid steps (0.5 USD on
Bitstamp BTC/USD, clipped to ``+-max_move``), the top-of-book depth imbalance and the tick's order-flow imbalance,
each binned on FIXED edges stored with the checkpoint; NaN is the missing token. A tick's tokens depend on that
tick and the mid before it only, so appending ticks never changes earlier tokens: a KV cache stays exact from tick
to tick and vLLM's prefix cache hits. The forecast after tick ``t`` is the distribution of the token ``move_{t+1}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import softmax

from ..tokenization_kvtrade import SpecialTokens

TOKENIZER_FILE = "orderbook_tokenizer.json"
FEATURE_COLUMNS = ("mid", "imbalance_1", "ofi")
# Inner edges of the OFI bins (BTC at the touch per tick). Around 70% of the training ticks have an OFI of zero to
# float residue, so a narrow bin holds exactly those; the others were placed from the training period's quantiles
# (5% and 95% at about -+0.14 BTC).
DEFAULT_OFI_EDGES = (-2.0, -0.5, -0.15, -0.05, -1e-9, 1e-9, 0.05, 0.15, 0.5, 2.0)


@dataclass(frozen=True)
class OrderBookTokenizer(SpecialTokens):
    """Ids ``0..3`` are the special tokens of :class:`~hf_kvtrade.ReturnTokenizer`, then the move bins
    (``-max_move .. +max_move`` mid steps), the imbalance bins (uniform over [-1, 1]) and the OFI bins."""

    tokens_per_tick = 3

    mid_step: float = 0.5
    max_move: int = 8
    imbalance_bins: int = 16
    ofi_edges: tuple[float, ...] = field(default=DEFAULT_OFI_EDGES)

    def __post_init__(self):
        if not (np.isfinite(self.mid_step) and self.mid_step > 0):
            raise ValueError(f"mid_step must be a positive price step, got {self.mid_step}")
        if self.max_move < 1:
            raise ValueError(f"max_move must be at least 1 mid step, got {self.max_move}")
        if self.imbalance_bins < 2:
            raise ValueError(f"imbalance_bins must be at least 2, got {self.imbalance_bins}")
        edges = np.asarray(self.ofi_edges, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 1 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            raise ValueError(f"ofi_edges must be finite and strictly increasing, got {self.ofi_edges}")
        object.__setattr__(self, "ofi_edges", tuple(float(edge) for edge in edges))

    @property
    def num_move_bins(self) -> int:
        return 2 * self.max_move + 1

    @property
    def first_move_id(self) -> int:
        return self.num_special_tokens

    @property
    def first_imbalance_id(self) -> int:
        return self.first_move_id + self.num_move_bins

    @property
    def first_ofi_id(self) -> int:
        return self.first_imbalance_id + self.imbalance_bins

    @property
    def num_bins(self) -> int:
        """Non-special tokens: what ``KVTradeConfig.num_bins`` must be for a model of this tokenizer."""
        return self.num_move_bins + self.imbalance_bins + len(self.ofi_edges) + 1

    @property
    def vocab_size(self) -> int:
        return self.num_special_tokens + self.num_bins

    @property
    def move_ids(self) -> slice:
        """The slice of the vocabulary (and of a logits row) that holds the move bins."""
        return slice(self.first_move_id, self.first_imbalance_id)

    @property
    def move_steps(self) -> np.ndarray:
        """The move of each move bin in mid steps; the end bins hold every larger move."""
        return np.arange(-self.max_move, self.max_move + 1)

    def move_bins(self, moves: np.ndarray) -> np.ndarray:
        """Bin index (0-based) of each finite mid move given in price units."""
        steps = np.rint(np.asarray(moves, dtype=np.float64) / self.mid_step)
        return (np.clip(steps, -self.max_move, self.max_move) + self.max_move).astype(np.int64)

    def encode_ticks(self, mid, imbalance, ofi, previous_mid: float = np.nan) -> np.ndarray:
        """``3 * len(mid)`` ids of consecutive ticks; ``previous_mid`` is the mid of the tick before the first."""
        mid, imbalance, ofi = (np.atleast_1d(np.asarray(values, dtype=np.float64)) for values in (mid, imbalance, ofi))
        if not mid.shape == imbalance.shape == ofi.shape or mid.ndim != 1:
            raise ValueError(f"mid, imbalance and ofi must be 1-d of one length, got {mid.shape}, {imbalance.shape}, {ofi.shape}")
        bad = np.flatnonzero(np.isfinite(imbalance) & (np.abs(imbalance) > 1))
        if bad.size:
            raise ValueError(f"imbalance at tick {bad[0]} is {imbalance[bad[0]]}: a depth imbalance lies in [-1, 1]")
        moves = np.diff(mid, prepend=previous_mid)
        safe = np.nan_to_num
        imbalance_bins = np.minimum(((safe(imbalance) + 1) / 2 * self.imbalance_bins).astype(np.int64), self.imbalance_bins - 1)
        binned = [
            (moves, self.move_bins(safe(moves)) + self.first_move_id),
            (imbalance, imbalance_bins + self.first_imbalance_id),
            (ofi, np.searchsorted(self.ofi_edges, safe(ofi), side="right") + self.first_ofi_id),
        ]
        ids = [np.where(np.isfinite(values), bins, self.missing_token_id) for values, bins in binned]
        return np.stack(ids, axis=1).reshape(-1)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """The ids of a feature frame (``hf_kvtrade.orderbook.features``), three per row; the first move is missing."""
        missing = [column for column in FEATURE_COLUMNS if column not in frame.columns]
        if missing:
            raise ValueError(f"feature frame has no column {missing[0]!r} (needs {', '.join(FEATURE_COLUMNS)})")
        return self.encode_ticks(*(frame[column].to_numpy() for column in FEATURE_COLUMNS))

    def move_distribution(self, logits) -> np.ndarray:
        """Probabilities over the move bins from logits over the vocabulary (the softmax of the move logits alone,
        which is the model's distribution renormalised over the move bins)."""
        return softmax(np.asarray(logits, dtype=np.float64)[..., self.move_ids], axis=-1)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        path = Path(directory, TOKENIZER_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"tokenizer_class": type(self).__name__, **asdict(self)}, indent=2))
        return str(path)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> OrderBookTokenizer:
        path = Path(directory, TOKENIZER_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{os.fspath(directory)!r} has no {TOKENIZER_FILE}: not an order-book checkpoint")
        settings = json.loads(path.read_text())
        if (name := settings.pop("tokenizer_class", None)) != cls.__name__:
            raise ValueError(f"{path} describes a {name}, not an {cls.__name__}")
        return cls(**settings)  # __post_init__ makes the edges a tuple


__all__ = ["FEATURE_COLUMNS", "TOKENIZER_FILE", "OrderBookTokenizer"]
