"""The forecasts of a batch of next-token logits, summarised once in torch for every row.

:class:`~hf_kvtrade.distribution.BinnedDistribution`'s maths (mass uniform in each bin: a piecewise linear CDF, exact
quantiles) in a handful of float64 tensor ops for all rows of a step, instead of numpy calls per tick; each
``Forecast`` still carries its ``BinnedDistribution``. (``distribution.py`` stays torch-free for the HTTP client.)
"""

from __future__ import annotations

import numpy as np
import torch

from ..distribution import BinnedDistribution, Forecast


class ForecastSummarizer:
    """Turns ``(rows, vocab_size)`` logits over the bins of ``tokenizer`` into one ``Forecast`` per row, with the
    ``quantiles`` levels, P(up), the mean and the distribution."""

    def __init__(self, tokenizer, quantiles):
        levels = np.asarray(quantiles, dtype=np.float64)
        if np.any((levels <= 0) | (levels >= 1)):
            raise ValueError(f"quantile levels must lie strictly between 0 and 1, got {levels.tolist()}")
        self.levels = levels
        self.first_bin, self.stop = tokenizer.first_bin_id, tokenizer.vocab_size
        self.edges_numpy = np.asarray(tokenizer.bin_edges, dtype=np.float64)
        self.edges = torch.as_tensor(self.edges_numpy)
        self.widths = self.edges.diff()
        self.centers = 0.5 * (self.edges[:-1] + self.edges[1:])
        # Share of each bin below a log-return of zero: P(up) = 1 - sum(probs * share).
        self.below_zero = ((0.0 - self.edges[:-1]) / self.widths).clamp(0.0, 1.0)
        self.levels_tensor = torch.as_tensor(levels)

    def __call__(self, logits: torch.Tensor, last_prices: list[float]) -> list[Forecast]:
        token_probs = torch.softmax(logits.float(), dim=-1).double().cpu()
        probs = token_probs[:, self.first_bin : self.stop]
        probs = probs / probs.sum(-1, keepdim=True)
        mean = probs @ self.centers
        prob_up = 1.0 - probs @ self.below_zero
        quantiles = self._quantiles(probs)
        probs_numpy, quantiles, prob_up, mean = probs.numpy(), quantiles.numpy(), prob_up.numpy(), mean.numpy()
        return [
            Forecast(
                last_price=float(price),
                quantile_levels=self.levels,
                return_quantiles=quantiles[row : row + 1],
                prob_up=prob_up[row : row + 1],
                mean_return=mean[row : row + 1],
                distribution=BinnedDistribution(probs_numpy[row], self.edges_numpy),
            )
            for row, price in enumerate(last_prices)
        ]

    def _quantiles(self, probs: torch.Tensor) -> torch.Tensor:
        """Inverse of the piecewise-linear CDF at each level: the bin the level falls in, then linearly inside it."""
        cdf = torch.cat([probs.new_zeros((probs.shape[0], 1)), probs.cumsum(-1)], dim=-1)
        levels = self.levels_tensor.expand(probs.shape[0], -1).contiguous()
        # The first edge whose CDF reaches the level closes the bin; empty bins (flat CDF) are never chosen.
        upper = torch.searchsorted(cdf, levels).clamp(1, cdf.shape[-1] - 1)
        lower = upper - 1
        cdf_lower, cdf_upper = cdf.gather(-1, lower), cdf.gather(-1, upper)
        inside = ((levels - cdf_lower) / (cdf_upper - cdf_lower)).clamp(0.0, 1.0)
        return self.edges[lower] + inside * self.widths[lower]


__all__ = ["ForecastSummarizer"]
