"""Prices in, forecast out with Transformers: the `BaseForecaster` flow on a `KVTradeForCausalLM`."""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import DynamicCache

from . import register_auto_classes
from .checkpoint import load_checkpoint
from .context import ContextPolicy
from .distribution import DEFAULT_QUANTILES, BaseForecaster, Forecast, PathSampling
from .modeling_kvtrade import KVTradeForCausalLM
from .tokenization_kvtrade import ReturnTokenizer

# Every save and load goes through here: the Auto classes must know `kvtrade` before either.
register_auto_classes()


class Forecaster(BaseForecaster):
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
        """Writes weights, config (with the bin grid) and model code (for trust_remote_code)."""
        self.model.save_pretrained(path)

    def encode_context(self, prices, horizon: int = 1) -> torch.Tensor:
        """The context policy's tokens of ``prices`` for a ``horizon``-bar forecast, as a (1, n) tensor."""
        return torch.as_tensor(super().encode_context(prices, horizon), device=self.model.device).unsqueeze(0)

    @torch.inference_mode()
    def next_token_probs(self, prompts: list[torch.Tensor]) -> np.ndarray:
        logits = torch.cat([self.model(input_ids=ids, logits_to_keep=1).logits[:, -1] for ids in prompts])
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def sample_paths(self, prompts: list[torch.Tensor], horizon: int, num_samples: int, seed: int | None = None):
        """Each prompt's history is prefilled once and its cache repeated for every path (``num_return_sequences``
        would prefill it once per path); a seed restarts torch's generator for every prompt."""
        sampling = PathSampling.for_tokenizer(self.tokenizer, horizon, num_samples, seed)
        paths = []
        for input_ids in prompts:
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
            paths.append(output[:, input_ids.shape[1] :].cpu().numpy())
        return np.stack(paths)


__all__ = ["DEFAULT_QUANTILES", "Forecast", "Forecaster"]
