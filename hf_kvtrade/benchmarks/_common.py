"""Helpers shared by the benchmarks: what machine a row ran on, timing percentiles, and the JSON writer.

Every benchmark row carries ``machine_info()`` so that numbers from different machines are never compared by
accident; ``write_json`` is how each ``kvtrade bench NAME --json PATH`` writes its payload.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """CPU model, logical cores, torch's intra-op threads, torch/transformers versions and the ``device`` measured on.

    Threads matter on a shared CPU: with other processes busy, one thread per step often beats spinning barriers.
    """
    import torch
    import transformers

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def percentile_ms(seconds: list[float], q: float = 50.0) -> float:
    """The ``q``-th percentile of durations given in seconds, in milliseconds."""
    return float(np.percentile(np.asarray(seconds) * 1e3, q))


def time_calls(function: Callable[[], object], repeats: int, warmup: int = 1, synchronize=None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``function`` after ``warmup`` untimed ones.

    ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, so GPU work is counted.
    """
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        function()
    durations = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        function()
        sync()
        durations.append(time.perf_counter() - start)
    return durations


def context_list(text: str) -> tuple[int, ...]:
    """argparse ``type`` for a comma-separated list of positive token counts, e.g. ``1024,4096``."""
    try:
        lengths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"context lengths must be positive, got {text!r}")
    return lengths


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Writes ``payload`` as indented JSON (creating parent folders) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


__all__ = ["context_list", "machine_info", "percentile_ms", "time_calls", "write_json"]
