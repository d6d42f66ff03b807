"""Helpers shared by the benchmarks: their common flags, the machine a row ran on, timing, verdicts and JSON.

Every benchmark row carries ``machine_info()``, so that numbers from different machines are never compared by accident.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..checkpoint import SHIPPED_CHECKPOINT


def add_common_arguments(parser, name: str, quick: str | None = None, checkpoint=False, threads=False) -> None:
    """``--json`` (``out/bench/NAME.json``); ``--quick`` with its help, the shipped ``--checkpoint``, ``--threads``."""
    parser.add_argument(
        "--json", default=f"out/bench/{name}.json", help="where to write the results (default: %(default)s)"
    )
    if quick:
        parser.add_argument("--quick", action="store_true", help=quick)
    if checkpoint:
        parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="model folder (default: %(default)s)")
    if threads:
        # One-token steps on a shared CPU prefer one thread: spinning barriers wait on busy cores.
        parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else None
    return model.group(1).strip() if model else platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """CPU model, logical cores, torch's threads, torch/transformers versions and the ``device`` measured on."""
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


def machine_label(info: dict) -> str:
    """The machine of a printed target line: CPU model, cores and torch threads."""
    return f"{info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch thread(s))"


def report_machine(info: dict) -> str:
    """The machine of a report row: CPU model, cores and the device measured on."""
    return f"{info.get('cpu', '?')} ({info.get('cores', '?')} cores, {info.get('device', 'cpu')})"


def markdown_table(title: str, columns: dict, rows: list[dict], machine: dict) -> str:
    """A section of report.md: a row per dict, a column per ``{header: the row's field (blank where it has none) or a
    function of the row}``, and last the row's machine (its own, else ``machine``)."""

    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "" if value is None else str(value)

    lines = [f"## {title}\n", "| " + " | ".join([*columns, "machine"]) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = [cell(key(row) if callable(key) else row.get(key)) for key in columns.values()]
        lines.append("| " + " | ".join([*cells, report_machine(row.get("machine") or machine)]) + " |")
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def print_target(target: str, measured: str, met: bool, machine: dict) -> str:
    """Prints a target's line, what was measured and met/MISSED with the machine; returns the verdict."""
    print(f"target {target}: {measured}, {verdict(met)} on {machine_label(machine)}", flush=True)
    return verdict(met)


def percentile_ms(seconds: list[float], q: float = 50.0) -> float:
    """The ``q``-th percentile of durations given in seconds, in milliseconds."""
    return float(np.percentile(np.asarray(seconds) * 1e3, q))


def time_calls(function: Callable[[], object], repeats: int, warmup: int = 1, synchronize=None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``function`` after ``warmup`` untimed ones; ``synchronize`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read, so that GPU work is counted."""
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
