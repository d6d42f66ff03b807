"""Prices in, forecast out: the next-token distribution of a KVTrade model read as a return forecast.

Horizon 1 is exact (the softmax over return bins, no sampling). Longer horizons sample whole paths with
``generate`` and summarise them. The result type, ``Forecast``, lives in the torch-free ``distribution`` module, so the vLLM client returns it
without importing torch.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import DynamicCache

from .context import ContextPolicy
from .distribution import DEFAULT_QUANTILES, BinnedDistribution, Forecast, PathSampling
from .modeling_kvtrade import KVTradeForCausalLM
from .checkpoint import load_checkpoint
from .tokenization_kvtrade import ReturnTokenizer
from . import register_auto_classes

# Every save and load goes through here: the Auto classes must know `kvtrade` before either.
register_auto_classes()

class Forecaster:
    """Wraps a ``KVTradeForCausalLM`` and its ``ReturnTokenizer``.

    >>> forecaster = Forecaster.from_pretrained("checkpoints/kvtrade-small")
    >>> forecast = forecaster.predict(prices, horizon=1)
    >>> forecast.prob_up, forecast.price_quantiles
    """

    def __init__(self, model: KVTradeForCausalLM, tokenizer: ReturnTokenizer | None = None):
        self.model = model.eval()
        self.context_policy = ContextPolicy.from_config(model.config)
        # The config holds the bin grid (a saved checkpoint has no other copy): a tokenizer must be the config's.
        self.tokenizer = ReturnTokenizer.from_config(model.config)
        if tokenizer is not None and tokenizer != self.tokenizer:
            raise ValueError(f"tokenizer {tokenizer} does not match the model config's bin grid {self.tokenizer}")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **model_kwargs) -> "Forecaster":
        return cls(*load_checkpoint(path, **model_kwargs))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes a self-contained checkpoint: weights, config (with the tokenizer's bin grid) and model code (for
        trust_remote_code)."""
        self.model.save_pretrained(path)

    def encode_context(self, prices, horizon: int = 1) -> torch.Tensor:
        """The context policy's tokens of ``prices`` for a ``horizon``-bar forecast, as a (1, n) tensor."""
        ids = self.context_policy.select(self.tokenizer.encode(prices), horizon)
        return torch.as_tensor(ids, device=self.model.device).unsqueeze(0)

    @torch.inference_mode()
    def next_token_probs(self, input_ids: torch.Tensor) -> np.ndarray:
        logits = self.model(input_ids=input_ids, logits_to_keep=1).logits[:, -1]
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def predict(
        self,
        prices,
        horizon: int = 1,
        num_samples: int = 256,
        quantiles=DEFAULT_QUANTILES,
        seed: int | None = None,
    ) -> Forecast:
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        prices = np.asarray(prices, dtype=np.float64)
        input_ids = self.encode_context(prices, horizon)
        last_price = float(prices[-1])
        if horizon == 1:
            distribution = BinnedDistribution.from_token_probs(self.next_token_probs(input_ids)[0], self.tokenizer)
            return Forecast.from_distribution(distribution, last_price, quantiles)
        paths = self.sample_paths(input_ids, horizon, num_samples, seed)
        return Forecast.from_paths(self.tokenizer.decode(paths), last_price, quantiles)

    @torch.inference_mode()
    def sample_paths(
        self, input_ids: torch.Tensor, horizon: int, num_samples: int, seed: int | None = None
    ) -> np.ndarray:
        """Token ids of ``num_samples`` continuations sampled as `PathSampling` says, shape ``(num_samples, horizon)``.

        The history is prefilled once and its cache repeated for every path (``num_return_sequences`` would
        prefill it once per path).
        """
        sampling = PathSampling.for_tokenizer(self.tokenizer, horizon, num_samples, seed)
        if seed is not None:
            torch.manual_seed(seed)
        cache = DynamicCache(config=self.model.config)
        if input_ids.shape[1] > 1:
            self.model(input_ids=input_ids[:, :-1], past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(num_samples)
        batch_ids = input_ids.expand(num_samples, -1)
        output = self.model.generate(
            input_ids=batch_ids,
            attention_mask=torch.ones_like(batch_ids),
            past_key_values=cache,
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling.generate_kwargs(),
        )
        return output[:, input_ids.shape[1] :].cpu().numpy()


__all__ = ["DEFAULT_QUANTILES", "Forecast", "Forecaster"]
