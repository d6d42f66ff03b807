"""Streaming forecasts: one KV-cached session per symbol, one new token per bar, a forecast for every tick.

:mod:`.engine` (:class:`StreamingForecaster`), :mod:`.sessions` (sessions and their memory budget), :mod:`.decoder`
(prefill and the batched decode step), :mod:`.slots` (the ``full`` policy's slot pool), :mod:`.summary`.
"""

from .engine import StreamingForecaster, TickForecast

__all__ = ["StreamingForecaster", "TickForecast"]
