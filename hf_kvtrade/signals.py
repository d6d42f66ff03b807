"""Trading signals from a one-step forecast: the all-or-nothing :class:`SignalRule` and the position sized by the
forecast volatility, :class:`VolTargetRule`. Both are called as ``rule(forecast) -> Signal``."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np


def _check_costs(transaction_cost: float, cost_multiple: float) -> None:
    if not (math.isfinite(transaction_cost) and transaction_cost >= 0):
        raise ValueError(f"transaction_cost must be a finite fraction >= 0, got {transaction_cost}")
    if not (math.isfinite(cost_multiple) and cost_multiple >= 0):
        raise ValueError(f"cost_multiple must be finite and >= 0, got {cost_multiple}")


class Signal(enum.IntEnum):
    """The value is the target position in units of equity (short = -1, flat = 0, long = +1)."""

    SHORT = -1
    NEUTRAL = 0
    LONG = 1


@dataclass(frozen=True)
class SignalRule:
    """LONG when ``P(up) >= prob_threshold`` AND the expected log-return beats ``cost_multiple * transaction_cost``
    (a skewed distribution can put most mass above zero with a negative mean); SHORT is the mirror image, unless
    ``allow_short`` is False; anything else is NEUTRAL. ``transaction_cost`` is one-way, a fraction of the traded
    value (1e-4 = 1 basis point)."""

    prob_threshold: float = 0.52
    transaction_cost: float = 1e-4
    cost_multiple: float = 1.0
    allow_short: bool = True

    def __post_init__(self):
        if not 0.5 <= self.prob_threshold < 1.0:
            raise ValueError(f"prob_threshold must lie in [0.5, 1), got {self.prob_threshold}")
        _check_costs(self.transaction_cost, self.cost_multiple)

    def decide(self, prob_up: float, expected_return: float) -> Signal:
        min_edge = self.cost_multiple * self.transaction_cost
        if prob_up >= self.prob_threshold and expected_return > min_edge:
            return Signal.LONG
        if self.allow_short and prob_up <= 1.0 - self.prob_threshold and expected_return < -min_edge:
            return Signal.SHORT
        return Signal.NEUTRAL

    def __call__(self, forecast) -> Signal:
        """Signal for the first step of a ``Forecast``."""
        return self.decide(float(forecast.prob_up[0]), float(forecast.mean_return[0]))


# E|r| = sqrt(2 / pi) * std for a normal return: what a correct call of the direction earns per unit of position.
MEAN_ABS_PER_STD = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class VolTargetRule:
    """Volatility targeting: position ``target_vol / forecast_std``, at most ``max_leverage``, signed by P(up).

    A right call of the direction earns ``|2 P(up) - 1| * E|r|`` per unit of position and acting on it costs about
    ``cost_multiple * transaction_cost`` (2: in and out again), so P(up) sets the direction only when

        |P(up) - 1/2| > max(min_prob_edge, cost_multiple * transaction_cost / (2 * sqrt(2/pi) * forecast_std)),

    ``min_prob_edge`` keeping the rule off the noise around 1/2 when costs are negligible. A confident down call is
    short, or flat without ``allow_short``. Otherwise ``fallback="long"`` holds the vol-scaled long (the GARCH
    vol-scaling baseline's position with the model's volatility: the assets traded here drift up, and that is the
    baseline to beat) and ``fallback="flat"`` stays out. ``target_vol`` is a per-bar std of log-returns; ``None``
    leaves it to the backtest (each series' pre-test std), and calling the rule then needs one.
    """

    target_vol: float | None = None
    max_leverage: float = 2.0
    transaction_cost: float = 1e-4
    cost_multiple: float = 2.0
    min_prob_edge: float = 0.02
    allow_short: bool = True
    fallback: str = "long"

    def __post_init__(self):
        if self.target_vol is not None and not (math.isfinite(self.target_vol) and self.target_vol > 0):
            raise ValueError(f"target_vol must be a positive per-bar std, got {self.target_vol}")
        if not (math.isfinite(self.max_leverage) and self.max_leverage > 0):
            raise ValueError(f"max_leverage must be finite and > 0, got {self.max_leverage}")
        _check_costs(self.transaction_cost, self.cost_multiple)
        if not 0 <= self.min_prob_edge < 0.5:
            raise ValueError(f"min_prob_edge must lie in [0, 0.5), got {self.min_prob_edge}")
        if self.fallback not in ("long", "flat"):
            raise ValueError(f"fallback must be 'long' or 'flat', got {self.fallback!r}")

    def prob_edge_needed(self, forecast_std):
        """The ``|P(up) - 1/2|`` a direction needs at this forecast std (array in, array out)."""
        std = np.maximum(np.asarray(forecast_std, dtype=np.float64), 1e-12)
        return np.maximum(self.min_prob_edge, self.cost_multiple * self.transaction_cost / (2 * MEAN_ABS_PER_STD * std))

    def position(self, prob_up, forecast_std, target_vol: float | None = None):
        """Signed position(s) for P(up) and forecast std (scalars or arrays of one shape); ``target_vol`` overrides
        the rule's own."""
        target = self.target_vol if target_vol is None else target_vol
        if target is None:
            raise ValueError("target_vol is not set: give the rule one, or pass target_vol")
        prob_up = np.asarray(prob_up, dtype=np.float64)
        std = np.asarray(forecast_std, dtype=np.float64)
        if np.any(~np.isfinite(std) | (std < 0)):
            raise ValueError("forecast std must be finite and >= 0")
        size = np.minimum(target / np.maximum(std, 1e-12), self.max_leverage)
        edge = prob_up - 0.5
        confident = np.abs(edge) > self.prob_edge_needed(std)
        default = 1.0 if self.fallback == "long" else 0.0
        direction = np.where(confident, np.where(edge > 0, 1.0, -1.0 if self.allow_short else 0.0), default)
        result = direction * size + 0.0  # + 0.0 turns -0.0 into 0.0
        return float(result) if result.ndim == 0 else result

    def size(self, forecast) -> float:
        """Signed position for the first step of a ``Forecast``."""
        return self.position(float(forecast.prob_up[0]), forecast_std(forecast))

    def __call__(self, forecast) -> Signal:
        """The direction of :meth:`size` (the streaming engine's ``signal_rule`` interface)."""
        return Signal(int(np.sign(self.size(forecast))))


def forecast_std(forecast) -> float:
    """Std of the first-step log-return of a ``Forecast``: from its distribution, or else its sampled paths."""
    if forecast.distribution is not None:
        return float(np.ravel(forecast.distribution.std())[0])
    if forecast.paths is not None:
        return float(np.std(forecast.paths[:, 0]))
    raise ValueError("the forecast has neither a distribution nor sampled paths to take a volatility from")
