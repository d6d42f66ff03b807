"""Streaming forecasts: one KV-cached session per symbol, one new token per bar, a forecast for every tick.

- :mod:`.engine`: :class:`StreamingForecaster`, bars in and :class:`TickForecast` out, following the checkpoint's
  context policy.
- :mod:`.sessions`: the per-symbol sessions and the memory budget their caches share (LRU eviction).
- :mod:`.decoder`: prefill, and the batched one-token decode step of the ``full`` policy.
- :mod:`.slots`: the slot pool that holds the ``full`` policy's sessions' keys and values, one tensor per layer.
"""

from .engine import BOUNDED_POLICIES, StreamingForecaster, TickForecast

__all__ = ["BOUNDED_POLICIES", "StreamingForecaster", "TickForecast"]
