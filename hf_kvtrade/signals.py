"""Trading signals from a one-step forecast. Two rules, both called as ``rule(forecast) -> Signal``:

- :class:`SignalRule` (all or nothing): a forecast earns a LONG signal when the probability of an up move clears
  ``prob_threshold`` AND the expected log-return beats the transaction cost by ``cost_multiple``; SHORT is the
  mirror image; anything else is NEUTRAL. Both tests are needed: a skewed distribution can put most mass above
  zero with a negative mean.
- :class:`VolTargetRule` (sized by the distribution): the position is ``target_vol / forecast std``, capped at
  ``max_leverage``, so it uses the forecast's width, not only its sign. Its direction comes from P(up) only when
  P(up) is far enough from 1/2 to pay for trading on it; otherwise it holds the vol-scaled long (the GARCH
  vol-scaling baseline's position, with the model's volatility). ``rule.size(forecast)`` is the signed position;
  ``rule(forecast)`` its sign as a ``Signal``, for code that only needs the direction.
"""

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
        _check_costs(self.transaction_cost, self.cost_multiple)

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


# E|r| = sqrt(2 / pi) * std for a normal return: what a correct call of the direction earns per unit of position.
MEAN_ABS_PER_STD = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class VolTargetRule:
    """Volatility targeting: position ``target_vol / forecast_std``, at most ``max_leverage``, signed by P(up).

    **Direction.** Calling the direction right earns ``|2 P(up) - 1| * E|r|`` per unit of position (``E|r|``
    taken as ``sqrt(2/pi)`` times the forecast std, as for a normal return), and acting on a call costs about
    ``cost_multiple * transaction_cost`` per unit (2: in and out again). So P(up) sets the direction only when

        |P(up) - 1/2| > max(min_prob_edge, cost_multiple * transaction_cost / (2 * sqrt(2/pi) * forecast_std)),

    i.e. when the edge pays the costs, and ``min_prob_edge`` keeps a model from trading on noise around 1/2 when
    costs are negligible. A confident up forecast is long; a confident down forecast is short, or flat when
    ``allow_short`` is False.

    **No confident direction** (the default case for a model whose P(up) stays near 1/2): ``fallback="long"``
    holds the vol-scaled long, like the GARCH vol-scaling baseline but with the model's volatility;
    ``fallback="flat"`` stays out of the market. Long is the default because the assets traded here drift up
    and a vol-scaled long is the baseline this rule must beat; the rule then differs from that baseline only
    in its volatility forecast and in the bars where the model is confidently bearish.

    Args:
        target_vol: volatility the position aims for, as a per-bar std of log-returns (0.01: 1% per bar). ``None``
            leaves it to the backtest, which uses each series' own std before its test period (as the GARCH
            baseline does); calling the rule needs a number.
        max_leverage: cap on the absolute position, in units of equity.
        transaction_cost: one-way cost of a trade as a fraction of the traded value.
        cost_multiple: how many one-way costs a directional call must earn (2: a round trip).
        min_prob_edge: the smallest ``|P(up) - 1/2|`` ever acted on.
        allow_short: when False, a confident down forecast gives a flat position instead of a short one.
        fallback: ``"long"`` or ``"flat"``: the position when P(up) is not confident enough.
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
        """Signed position(s) for P(up) and forecast std (scalars or arrays of one shape).

        ``target_vol`` overrides the rule's own (the backtest passes each series' pre-test std).
        """
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


__all__ = ["Signal", "SignalRule", "VolTargetRule", "forecast_std"]
