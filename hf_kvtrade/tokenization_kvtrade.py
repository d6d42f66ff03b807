"""Stateless, causal tokenizer of price series into log-return bins.

Every bar's token depends only on that bar and the bar before it, through a FIXED grid of bins: no scale is
estimated from the context. So ``encode(prices[:n])`` is always a prefix of ``encode(prices[:n + k])``, which is
what makes a KV cache exact across ticks and lets vLLM's prefix cache hit on every new bar.

The grid is uniform after mu-law companding of the clipped log-return, so bins are narrow around zero (where
most returns are) and wide in the tails.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np


def read_config(checkpoint: str | os.PathLike) -> dict:
    """A saved checkpoint's ``config.json``, read with ``json`` alone (clients need neither torch nor Transformers)."""
    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(checkpoint)!r}: {path} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None


@dataclass(frozen=True)
class Encoding:
    """Token ids of a series, the log-returns they stand for, and which returns fell outside the clip range."""

    ids: np.ndarray
    returns: np.ndarray
    clipped: np.ndarray = field(repr=False)

    @property
    def clipped_indices(self) -> np.ndarray:
        return np.flatnonzero(self.clipped)


class SpecialTokens:
    """The ids every tokenizer of the project starts with: pad, bos, eos and missing-bar."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    missing_token_id = 3
    num_special_tokens = 4


@dataclass
class ReturnTokenizer(SpecialTokens):
    """Bins log-returns on a fixed mu-law grid.

    Ids ``0..3`` are the special tokens; ids ``4 .. 4 + num_bins - 1`` are return bins in increasing order.
    ``encode(prices)`` gives ``[bos]`` followed by one token per return, i.e. ``len(prices)`` ids.
    """

    num_bins: int = 1024
    clip: float = 0.2
    mu: float = 255.0
    bin_edges: np.ndarray = field(init=False, repr=False, compare=False)
    bin_widths: np.ndarray = field(init=False, repr=False, compare=False)
    bin_centers: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.num_bins < 2 or self.num_bins % 2:
            raise ValueError(f"num_bins must be an even number >= 2 (a bin edge sits at zero), got {self.num_bins}")
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite log-return, got {self.clip}")
        if not (np.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"mu must be positive, got {self.mu}")
        self.num_bins, self.clip, self.mu = int(self.num_bins), float(self.clip), float(self.mu)
        # A uniform grid on the companded scale [-1, 1], expanded back to log-returns.
        companded = np.linspace(-1.0, 1.0, self.num_bins + 1)
        self.bin_edges = np.sign(companded) * self.clip * np.expm1(np.abs(companded) * np.log1p(self.mu)) / self.mu
        self.bin_widths = np.diff(self.bin_edges)
        self.bin_centers = 0.5 * (self.bin_edges[:-1] + self.bin_edges[1:])

    @property
    def vocab_size(self) -> int:
        return self.num_special_tokens + self.num_bins

    @property
    def first_bin_id(self) -> int:
        return self.num_special_tokens

    def encode_returns(self, returns, missing: str = "error") -> np.ndarray:
        """Tokenizes log-returns directly, without ``bos``. NaN returns raise unless ``missing="token"``."""
        return self._encode_returns(returns, missing).ids

    def _encode_returns(self, returns, missing: str, bos: bool = False) -> Encoding:
        if missing not in ("error", "token"):
            raise ValueError(f"missing must be 'error' or 'token', got {missing!r}")
        returns = np.asarray(returns, dtype=np.float64)
        if returns.ndim != 1:
            raise ValueError(f"returns must be one-dimensional, got shape {returns.shape}")
        is_nan = np.isnan(returns)
        bad = np.flatnonzero(np.isinf(returns) | (is_nan & (missing == "error")))
        if bad.size:
            raise ValueError(f"return at index {bad[0]} is {returns[bad[0]]}: returns must be finite")
        ids = np.full(returns.shape, self.missing_token_id, dtype=np.int64)
        finite = ~is_nan
        ids[finite] = self._bins(returns[finite]) + self.first_bin_id
        clipped = finite & (np.abs(np.where(finite, returns, 0.0)) > self.clip)
        if clipped.any():
            warnings.warn(
                f"{int(clipped.sum())} returns beyond the clip range +-{self.clip} (first at index "
                f"{int(np.flatnonzero(clipped)[0])}) were put in the end bins; see Encoding.clipped",
                stacklevel=2,
            )
        if bos:
            ids = np.concatenate([[self.bos_token_id], ids])
            returns = np.concatenate([[np.nan], returns])
            clipped = np.concatenate([[False], clipped])
        return Encoding(ids=ids, returns=returns, clipped=clipped)

    def encode_with_info(self, prices, timestamps=None, missing: str = "error") -> Encoding:
        """Tokenizes a price series: one id per price (``bos`` for the first, then one per log-return).

        NaN prices become the missing-bar token when ``missing="token"``; the next return is then taken against
        the last valid price, which still depends on the past only.
        """
        prices = np.asarray(prices, dtype=np.float64)
        if prices.ndim != 1:
            raise ValueError(f"prices must be one-dimensional, got shape {prices.shape}")
        if prices.size == 0:
            raise ValueError("prices is empty: need at least one price")
        if timestamps is not None:
            self._check_timestamps(timestamps, len(prices))
        is_nan = np.isnan(prices)
        if missing == "error" and is_nan.any():
            index = int(np.flatnonzero(is_nan)[0])
            raise ValueError(f"price at index {index} is NaN (pass missing='token' to encode it as a missing bar)")
        bad = np.flatnonzero(~is_nan & ~(np.isfinite(prices) & (prices > 0)))
        if bad.size:
            raise ValueError(f"price at index {bad[0]} is {prices[bad[0]]}: prices must be positive and finite")
        if is_nan[0]:
            raise ValueError("price at index 0 is NaN: a series must start with a valid price")
        last_valid = np.maximum.accumulate(np.where(is_nan, 0, np.arange(len(prices))))
        log_prices = np.log(np.where(is_nan, 1.0, prices))
        returns = log_prices[1:] - log_prices[last_valid[:-1]]
        returns[is_nan[1:]] = np.nan
        return self._encode_returns(returns, missing, bos=True)

    def encode(self, prices, timestamps=None, missing: str = "error") -> np.ndarray:
        return self.encode_with_info(prices, timestamps=timestamps, missing=missing).ids

    def _bins(self, returns: np.ndarray) -> np.ndarray:
        """Bin index (0-based, not token id) of each finite log-return; values beyond the clip go to the end bins."""
        clipped = np.clip(returns, -self.clip, self.clip)
        companded = np.sign(clipped) * np.log1p(self.mu * np.abs(clipped) / self.clip) / np.log1p(self.mu)
        return np.clip(np.floor((companded + 1.0) * (self.num_bins / 2.0)).astype(np.int64), 0, self.num_bins - 1)

    @staticmethod
    def _check_timestamps(timestamps, length: int) -> None:
        stamps = np.asarray(timestamps)
        if len(stamps) != length:
            raise ValueError(f"got {len(stamps)} timestamps for {length} prices")
        if np.issubdtype(stamps.dtype, np.datetime64):
            stamps = stamps.astype("datetime64[ns]").astype(np.int64)
        bad = np.flatnonzero(np.diff(stamps) <= 0)
        if bad.size:
            raise ValueError(
                f"timestamp at index {bad[0] + 1} is not after the one before it: timestamps must be strictly increasing"
            )

    def decode(self, ids) -> np.ndarray:
        """Log-return (bin centre) of each id; special ids decode to NaN."""
        ids = np.asarray(ids, dtype=np.int64)
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            raise ValueError(f"token id at index {bad[0]} is {ids.flat[bad[0]]}, outside [0, {self.vocab_size})")
        bins = ids - self.first_bin_id
        return np.where(bins >= 0, self.bin_centers[np.maximum(bins, 0)], np.nan)

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike) -> "ReturnTokenizer":
        """The tokenizer of a saved checkpoint, from its ``config.json`` (the grid's one source) without torch."""
        return cls.from_config(read_config(checkpoint))

    @classmethod
    def from_config(cls, config) -> "ReturnTokenizer":
        """The tokenizer a ``KVTradeConfig`` (or its dict) was built for."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        return cls(num_bins=get("num_bins", 1024), clip=get("return_clip", 0.2), mu=get("mu_law", 255.0))


__all__ = ["Encoding", "ReturnTokenizer", "SpecialTokens"]
