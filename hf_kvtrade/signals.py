"""Trading signals from a one-step forecast: go long or short only when the edge pays for the trade.

A forecast earns a LONG signal when the probability of an up move clears ``prob_threshold`` AND the expected
log-return beats the transaction cost by ``cost_multiple``; SHORT is the mirror image; anything else is NEUTRAL.
Both tests are needed: a skewed distribution can put most mass above zero with a negative mean.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class Signal(enum.IntEnum):
    """The value is the target position in units of equity (short = -1, flat = 0, long = +1)."""

    SHORT = -1
    NEUTRAL = 0
    LONG = 1


@dataclass(frozen=True)
class SignalRule:
    """Thresholds that turn a forecast into a ``Signal``.

    Args:
        prob_threshold: LONG needs ``P(up) >= prob_threshold``; SHORT needs ``P(up) <= 1 - prob_threshold``.
        transaction_cost: one-way cost of a trade as a fraction of the traded value (1e-4 = 1 basis point).
        cost_multiple: the expected log-return must exceed ``cost_multiple * transaction_cost`` in the signal's
            direction; 2 covers a round trip.
        allow_short: when False, SHORT signals become NEUTRAL (long-only trading).
    """

    prob_threshold: float = 0.52
    transaction_cost: float = 1e-4
    cost_multiple: float = 1.0
    allow_short: bool = True

    def __post_init__(self):
        if not 0.5 <= self.prob_threshold < 1.0:
            raise ValueError(f"prob_threshold must lie in [0.5, 1), got {self.prob_threshold}")
        if not (np.isfinite(self.transaction_cost) and self.transaction_cost >= 0):
            raise ValueError(f"transaction_cost must be a finite fraction >= 0, got {self.transaction_cost}")
        if not (np.isfinite(self.cost_multiple) and self.cost_multiple >= 0):
            raise ValueError(f"cost_multiple must be finite and >= 0, got {self.cost_multiple}")

    @property
    def min_edge(self) -> float:
        return self.cost_multiple * self.transaction_cost

    def decide(self, prob_up: float, expected_return: float) -> Signal:
        if prob_up >= self.prob_threshold and expected_return > self.min_edge:
            return Signal.LONG
        if self.allow_short and prob_up <= 1.0 - self.prob_threshold and expected_return < -self.min_edge:
            return Signal.SHORT
        return Signal.NEUTRAL

    def __call__(self, forecast) -> Signal:
        """Signal for the first step of a ``Forecast``."""
        return self.decide(float(forecast.prob_up[0]), float(forecast.mean_return[0]))


__all__ = ["Signal", "SignalRule"]
