"""The context policy: which tokens of a history the model conditions on. Every path asks this module.

A model trained on windows of ``window`` tokens never reads more than ``window`` tokens (context plus forecast),
so no token sits at a position it was not trained on. A history of ``n`` tokens is read from an *anchor*: the
whole history while it fits, past that the most recent tokens from an anchor that moves ``stride`` tokens at a
time (a *rebase*). Between rebases the context grows one token per bar, so a streaming KV cache and vLLM's prefix
cache extend it instead of recomputing it. The anchor depends on ``n`` alone: a stateless call given the whole
history and a session that saw the same bars one at a time condition on the same tokens.

The policy is saved in the checkpoint's config (``training_context_length`` and ``context_stride``); this module
imports neither torch nor Transformers, so clients can use it with the config's JSON alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

from .tokenization_kvtrade import read_config


@dataclass(frozen=True)
class ContextPolicy:
    """Anchored windows: at most ``window`` tokens of context plus forecast, rebased ``stride`` tokens at a time.

    >>> policy = ContextPolicy(window=256, stride=128)
    >>> policy.start(200), policy.start(256), policy.start(300)   # anchors for histories of n tokens
    (0, 128, 128)
    """

    window: int
    stride: int

    def __post_init__(self):
        if self.window < 2:
            raise ValueError(f"context window must be at least 2 tokens, got {self.window}")
        if not 1 <= self.stride < self.window:
            raise ValueError(f"context stride must lie in [1, {self.window - 1}] for window {self.window}, got {self.stride}")

    @classmethod
    def from_config(cls, config) -> "ContextPolicy":
        """The policy saved in a ``KVTradeConfig`` (or its dict). An untrained preset, with no
        ``training_context_length``, may use all of ``max_position_embeddings``; the stride defaults to half the window.
        """
        get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
        window = get("training_context_length") or get("max_position_embeddings")
        if not window:
            raise ValueError("config has neither training_context_length nor max_position_embeddings: no context policy")
        return cls(window=int(window), stride=int(get("context_stride") or window // 2))

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike) -> "ContextPolicy":
        return cls.from_config(read_config(checkpoint))

    @property
    def max_horizon(self) -> int:
        """The longest forecast that still leaves at least one token of context after a rebase."""
        return self.window - self.stride

    def start(self, num_tokens: int, horizon: int = 1) -> int:
        """Index of the first token conditioned on, for a history of ``num_tokens`` and a forecast of ``horizon``.

        Context and forecast fill at most ``window`` positions; the anchor is a multiple of ``stride``.
        """
        if num_tokens < 1:
            raise ValueError(f"the history must hold at least one token, got {num_tokens}")
        if not 1 <= horizon <= self.max_horizon:
            raise ValueError(
                f"horizon must lie in [1, {self.max_horizon}] for a context window of {self.window} rebased every "
                f"{self.stride} tokens, got {horizon}"
            )
        overflow = num_tokens + horizon - self.window
        return 0 if overflow <= 0 else self.stride * math.ceil(overflow / self.stride)

    def select(self, ids: Sequence[int], horizon: int = 1):
        """The tokens of ``ids`` (a whole history) that a forecast of ``horizon`` bars conditions on."""
        return ids[self.start(len(ids), horizon) :]

    def shifted(self, prefix_length: int) -> "ContextPolicy":
        """The policy for the tokens that follow a fixed prefix of ``prefix_length`` tokens (a shared market prefix)."""
        window = self.window - prefix_length
        if window <= self.stride:
            raise ValueError(
                f"a prefix of {prefix_length} tokens leaves {window} of the {self.window}-token window, not more than "
                f"the rebase stride {self.stride}: use a shorter prefix"
            )
        return ContextPolicy(window=window, stride=self.stride)

    def scoring_windows(self, num_tokens: int, first_target: int = 1) -> list[tuple[int, int, int]]:
        """``(start, end, first_scored)`` windows over a series of ``num_tokens`` tokens, for training and evaluation.

        The model reads ``ids[start:end]``; its outputs predict the tokens ``first_scored .. end - 1``, each from
        exactly the context :meth:`start` gives its history, as in serving. Every target from ``first_target`` on is
        scored once.
        """
        if not 1 <= first_target <= num_tokens:
            raise ValueError(f"first_target must lie in [1, {num_tokens}], got {first_target}")
        windows = []
        target = first_target
        while target < num_tokens:
            start = self.start(target)
            # Targets that share this anchor: up to the history length at which the anchor moves on.
            end = min(start + self.window, num_tokens)
            windows.append((start, end, target))
            target = end
        return windows


__all__ = ["ContextPolicy"]
