"""Token probabilities as forecasts of log-returns, without torch: the one place where they become densities,
quantiles and CRPS, where paths are sampled the same on every backend, and where prices become a `Forecast`.

Probability mass is spread uniformly inside each bin, so the density is piecewise constant, the CDF piecewise
linear and quantiles exact inverses of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .context import ContextPolicy
from .tokenization_kvtrade import ReturnTokenizer


@dataclass
class BinnedDistribution:
    """``probs[..., num_bins]`` over bins with ``edges[num_bins + 1]`` (log-return units)."""

    probs: np.ndarray
    edges: np.ndarray

    def __post_init__(self):
        self.probs = np.asarray(self.probs, dtype=np.float64)
        self.edges = np.asarray(self.edges, dtype=np.float64)
        if self.probs.shape[-1] != len(self.edges) - 1:
            raise ValueError(f"probs has {self.probs.shape[-1]} bins but edges describe {len(self.edges) - 1}")
        total = self.probs.sum(-1, keepdims=True)
        if np.any(total <= 0):
            raise ValueError("a distribution has no probability mass on the return bins")
        self.probs = self.probs / total

    @classmethod
    def from_token_probs(cls, token_probs: np.ndarray, tokenizer) -> "BinnedDistribution":
        """Drops the special tokens' mass (pad/bos/eos/missing) and renormalizes over the return bins."""
        return cls(np.asarray(token_probs)[..., tokenizer.first_bin_id : tokenizer.vocab_size], tokenizer.bin_edges)

    @property
    def widths(self) -> np.ndarray:
        return np.diff(self.edges)

    @property
    def centers(self) -> np.ndarray:
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    def mean(self) -> np.ndarray:
        return self.probs @ self.centers

    def std(self) -> np.ndarray:
        # Uniform mass inside each bin adds width^2 / 12 to the variance of the bin centres.
        second_moment = self.probs @ (self.centers**2 + self.widths**2 / 12.0)
        return np.sqrt(np.maximum(second_moment - self.mean() ** 2, 0.0))

    def cdf(self, x) -> np.ndarray:
        """P(return <= x), broadcast over the batch dimensions of ``probs`` and of ``x``."""
        x = np.asarray(x, dtype=np.float64)[..., None]
        inside = np.clip((x - self.edges[:-1]) / self.widths, 0.0, 1.0)
        return np.sum(self.probs * inside, axis=-1)

    def prob_up(self) -> np.ndarray:
        return 1.0 - self.cdf(0.0)

    def quantile(self, levels) -> np.ndarray:
        """Returns shape ``batch + (len(levels),)``; monotone in ``levels`` by construction."""
        levels = np.atleast_1d(np.asarray(levels, dtype=np.float64))
        if np.any((levels <= 0) | (levels >= 1)):
            raise ValueError(f"quantile levels must lie strictly between 0 and 1, got {levels.tolist()}")
        cumulative = np.concatenate([np.zeros(self.probs.shape[:-1] + (1,)), np.cumsum(self.probs, -1)], -1)
        # np.interp needs increasing x; empty bins give flat stretches, which a tiny ramp breaks without moving mass.
        flat_cdf = cumulative.reshape(-1, cumulative.shape[-1]) + np.arange(cumulative.shape[-1]) * 1e-15
        out = np.stack([np.interp(levels, row, self.edges) for row in flat_cdf])
        return out.reshape(self.probs.shape[:-1] + (len(levels),))

    def log_density(self, x) -> np.ndarray:
        """Log-density at observed log-returns ``x`` (shape = batch shape); values beyond the grid use the end bins."""
        x = np.asarray(x, dtype=np.float64)
        bins = np.clip(np.searchsorted(self.edges, x, side="right") - 1, 0, len(self.widths) - 1)
        mass = np.take_along_axis(self.probs, bins[..., None], axis=-1)[..., 0]
        return np.log(np.maximum(mass, 1e-300)) - np.log(self.widths[bins])

    def crps(self, x) -> np.ndarray:
        """Continuous ranked probability score at observations ``x`` (lower is better), integrated exactly."""
        x = np.asarray(x, dtype=np.float64)
        cumulative = np.concatenate([np.zeros(self.probs.shape[:-1] + (1,)), np.cumsum(self.probs, -1)], -1)
        lo, hi = self.edges[:-1], self.edges[1:]
        f_lo, f_hi = cumulative[..., :-1], cumulative[..., 1:]
        # Inside bin [lo, hi] the CDF is linear from f_lo to f_hi; integrate (F - 1{t >= x})^2 exactly, splitting
        # the bin at x where it falls inside.
        split = np.clip(x[..., None], lo, hi)
        below = _integral_of_square(f_lo, f_hi, lo, hi, lo, split, offset=0.0)
        above = _integral_of_square(f_lo, f_hi, lo, hi, split, hi, offset=1.0)
        # Mass-free tails beyond the grid: F = 0 left of it, F = 1 right of it.
        tails = np.maximum(self.edges[0] - x, 0.0) + np.maximum(x - self.edges[-1], 0.0)
        return np.sum(below + above, axis=-1) + tails


DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class Forecast:
    """Forecast of the next ``horizon`` bars after ``last_price``.

    ``return_quantiles[h, j]`` is quantile ``quantile_levels[j]`` of the cumulative log-return over bars
    ``1..h+1``; ``price_quantiles`` is the same in price space. ``prob_up[h]`` is the probability that the price
    after ``h+1`` bars is above ``last_price``.
    """

    last_price: float
    quantile_levels: np.ndarray
    return_quantiles: np.ndarray
    prob_up: np.ndarray
    mean_return: np.ndarray
    distribution: BinnedDistribution | None = field(default=None, repr=False)
    paths: np.ndarray | None = field(default=None, repr=False)

    @property
    def horizon(self) -> int:
        return len(self.prob_up)

    @property
    def prob_down(self) -> np.ndarray:
        return 1.0 - self.prob_up

    @property
    def price_quantiles(self) -> np.ndarray:
        return self.last_price * np.exp(self.return_quantiles)

    @property
    def price_paths(self) -> np.ndarray | None:
        return None if self.paths is None else self.last_price * np.exp(np.cumsum(self.paths, axis=-1))

    @classmethod
    def from_distribution(cls, distribution: BinnedDistribution, last_price: float, quantiles) -> "Forecast":
        """Exact one-step forecast from a single next-bar distribution."""
        levels = np.asarray(quantiles, dtype=np.float64)
        return cls(
            last_price=float(last_price),
            quantile_levels=levels,
            return_quantiles=distribution.quantile(levels).reshape(1, -1),
            prob_up=np.atleast_1d(distribution.prob_up()),
            mean_return=np.atleast_1d(distribution.mean()),
            distribution=distribution,
        )

    @classmethod
    def from_paths(cls, paths: np.ndarray, last_price: float, quantiles) -> "Forecast":
        """Summary of sampled log-return paths of shape ``(num_samples, horizon)``."""
        levels = np.asarray(quantiles, dtype=np.float64)
        cumulative = np.cumsum(paths, axis=1)
        return cls(
            last_price=float(last_price),
            quantile_levels=levels,
            return_quantiles=np.quantile(cumulative, levels, axis=0).T,
            prob_up=(cumulative > 0).mean(axis=0),
            mean_return=cumulative.mean(axis=0),
            paths=paths,
        )


@dataclass(frozen=True)
class PathSampling:
    """How every backend samples forecast paths: ``num_samples`` continuations of exactly ``horizon`` tokens, each
    drawn from the model's full predictive distribution (temperature 1, no top-k or nucleus cut) over the return
    bins only, so that every sampled step is a return. Each method spells this in one backend's arguments.
    """

    horizon: int
    num_samples: int
    first_bin_id: int
    vocab_size: int
    seed: int | None = None

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")

    @classmethod
    def for_tokenizer(cls, tokenizer, horizon: int, num_samples: int, seed: int | None = None) -> "PathSampling":
        return cls(horizon, num_samples, tokenizer.first_bin_id, tokenizer.vocab_size, seed)

    def generate_kwargs(self) -> dict:
        """Arguments of Transformers' ``generate`` (whose default ``top_k`` would cut the distribution to 50 bins).
        It draws from torch's global generator, so ``seed`` is the caller's to apply."""
        return dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, min_new_tokens=self.horizon,
                    max_new_tokens=self.horizon, suppress_tokens=list(range(self.first_bin_id)))  # fmt: skip

    def vllm_kwargs(self) -> dict:
        """Fields of vLLM's ``SamplingParams``; its OpenAI-compatible ``/v1/completions`` takes the same names."""
        return dict(n=self.num_samples, seed=self.seed, temperature=1.0, top_p=1.0, top_k=-1,
                    min_tokens=self.horizon, max_tokens=self.horizon,
                    allowed_token_ids=list(range(self.first_bin_id, self.vocab_size)))  # fmt: skip


def next_token_kwargs(vocab_size: int) -> dict:
    """Fields of vLLM's ``SamplingParams`` (and ``/v1/completions``) for an exact horizon-1 forecast: one token and
    the logprob of every token in the vocabulary, so the distribution is whole, not a top-k truncation."""
    return {"max_tokens": 1, "logprobs": vocab_size}


class BaseForecaster(ABC):
    """Prices in, `Forecast` out, the same on every backend (Transformers, vLLM offline, vLLM server).

    A forecast conditions on the `ContextPolicy`'s tokens of the prices. Horizon 1 is exact: the next-bar
    distribution over the return bins. Longer horizons summarise paths sampled as `PathSampling` says. A backend
    says how it runs a batch of prompts, in the form its `encode_context` returns them.
    """

    tokenizer: ReturnTokenizer
    context_policy: ContextPolicy

    def encode_context(self, prices, horizon: int = 1):
        """The token ids of ``prices`` that a ``horizon``-bar forecast conditions on."""
        return self.context_policy.select(self.tokenizer.encode(prices), horizon).tolist()

    def predict(
        self, prices, horizon: int = 1, num_samples: int = 256, quantiles=DEFAULT_QUANTILES, seed: int | None = None
    ) -> Forecast:
        return self.predict_batch([prices], horizon, num_samples, quantiles, seed)[0]

    def predict_batch(
        self,
        series: Sequence,
        horizon: int = 1,
        num_samples: int = 256,
        quantiles=DEFAULT_QUANTILES,
        seed: int | None = None,
    ) -> list[Forecast]:
        """One forecast per price series; the vLLM backends run the whole batch at once."""
        if len(series) == 0:
            raise ValueError("series is empty: pass at least one price series")
        series = [np.asarray(prices, dtype=np.float64) for prices in series]
        prompts = [self.encode_context(prices, horizon) for prices in series]
        if horizon == 1:
            probs = self.next_token_probs(prompts)
            distributions = [BinnedDistribution.from_token_probs(row, self.tokenizer) for row in probs]
            return [Forecast.from_distribution(d, prices[-1], quantiles) for d, prices in zip(distributions, series)]
        paths = self.tokenizer.decode(self.sample_paths(prompts, horizon, num_samples, seed))
        return [Forecast.from_paths(returns, prices[-1], quantiles) for returns, prices in zip(paths, series)]

    @abstractmethod
    def next_token_probs(self, prompts: list) -> np.ndarray:
        """Probabilities over the whole vocabulary of the token after each prompt, shape ``(prompts, vocab)``."""

    @abstractmethod
    def sample_paths(self, prompts: list, horizon: int, num_samples: int, seed: int | None = None) -> np.ndarray:
        """Token ids of sampled continuations, shape ``(prompts, num_samples, horizon)``."""


def _integral_of_square(f_lo, f_hi, lo, hi, a, b, offset):
    """Integral over [a, b] of (F(t) - offset)^2 where F is linear from f_lo at lo to f_hi at hi."""
    slope = (f_hi - f_lo) / (hi - lo)
    g_a = f_lo + slope * (a - lo) - offset
    g_b = f_lo + slope * (b - lo) - offset
    return (b - a) * (g_a**2 + g_a * g_b + g_b**2) / 3.0


__all__ = ["BaseForecaster", "BinnedDistribution", "Forecast", "PathSampling", "next_token_kwargs"]
