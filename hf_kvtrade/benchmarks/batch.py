"""Batched ticks: one ``update_many`` step for N symbols against N sequential ``update`` calls, side by side.

Rounds alternate the two on the same primed sessions (histories of different lengths, so the batch is padded), so
load from other processes hits both alike; ``cpu_speedup`` is the ratio in thread CPU time, which waiting for a
shared core does not inflate. Method and results: docs/streaming.md.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from ._common import add_common_arguments, markdown_table

DEFAULT_SYMBOLS = (1, 8, 64, 256)
TARGET_SYMBOLS = 64
TARGET_SPEEDUP = 8.0


def add_arguments(parser) -> None:
    quick = "3 rounds, histories of at most 128 bars"
    add_common_arguments(parser, "batch", quick=quick, checkpoint=True, threads=True)
    parser.add_argument("--symbols", type=int, nargs="+", default=list(DEFAULT_SYMBOLS), help="symbol counts")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per symbol count (default: %(default)s)")
    parser.add_argument("--history", type=int, default=512, help="longest primed history in bars (default: %(default)s)")


@contextmanager
def _timed(into: list):
    """Appends the wall-clock and thread CPU seconds of the ``with`` block to ``into``."""
    started, started_cpu = time.perf_counter(), time.thread_time()
    yield
    into.append((time.perf_counter() - started, time.thread_time() - started_cpu))


def run(args) -> int:
    import numpy as np
    import torch

    from ..checkpoint import load_checkpoint
    from ..context import ContextPolicy
    from ..streaming import StreamingForecaster
    from ._common import machine_info, machine_label, percentile_ms, print_target, write_json

    rounds = 3 if args.quick else args.rounds
    longest = min(args.history, 128) if args.quick else args.history
    if rounds < 1 or min(args.symbols) < 1:
        raise SystemExit("--rounds and every --symbols count must be at least 1")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint)
    window = ContextPolicy.from_config(model.config).window
    # Each round adds two bars per symbol; the longest history must still fit the window with its forecast.
    if not 2 <= longest <= window - 1 - 2 * rounds:
        raise SystemExit(f"--history must lie in [2, {window - 1 - 2 * rounds}] for {rounds} rounds in a {window}-bar window")
    machine = machine_info("cpu")
    print(f"model: checkpoint {args.checkpoint}; machine {machine_label(machine)}")
    rng = np.random.default_rng(0)
    results = {}
    for count in args.symbols:
        engine = StreamingForecaster(model, tokenizer)
        lengths = rng.integers(max(2, longest // 2), longest + 1, size=count)
        prices = {}
        for index, length in enumerate(lengths):
            history = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, length)))
            engine.prime(f"s{index}", history)
            prices[f"s{index}"] = history[-1]
        moves = np.exp(rng.normal(0.0, 0.01, (2 * rounds, count)))
        batched, sequential = [], []  # (wall, CPU) seconds of each round
        for step in range(rounds):
            bars = {symbol: price * move for (symbol, price), move in zip(prices.items(), moves[2 * step])}
            with _timed(batched):
                engine.update_many(bars)
            prices = {symbol: price * move for (symbol, price), move in zip(bars.items(), moves[2 * step + 1])}
            with _timed(sequential):
                for symbol, bar in prices.items():
                    engine.update(symbol, bar)
        (batch_s, batch_cpu_s), (sequential_s, sequential_cpu_s) = zip(*batched), zip(*sequential)
        batched_rate, sequential_rate = count * rounds / sum(batch_s), count * rounds / sum(sequential_s)
        results[str(count)] = {
            "symbols": count,
            "history_bars": [int(lengths.min()), int(lengths.max())],
            "batched_ticks_per_s": round(batched_rate, 1),
            "sequential_ticks_per_s": round(sequential_rate, 1),
            "speedup": round(batched_rate / sequential_rate, 2),
            # The same ratio in CPU time of the ticking thread: what it is when no other process takes the core.
            "cpu_speedup": round(sum(sequential_cpu_s) / sum(batch_cpu_s), 2),
            "batch_step_p50_ms": round(percentile_ms(batch_s, 50), 2),
            "batch_step_p99_ms": round(percentile_ms(batch_s, 99), 2),
            "sequential_round_p50_ms": round(percentile_ms(sequential_s, 50), 2),
            "cache_bytes": engine.cache_bytes(),
        }
        print(f"{count:4d} symbols: {results[str(count)]}", flush=True)
        del engine
    target, met = results.get(str(TARGET_SYMBOLS)), None
    if target is not None:
        met = print_target(
            f">= {TARGET_SPEEDUP:g}x throughput at {TARGET_SYMBOLS} symbols vs sequential update",
            f"{target['speedup']}x ({target['cpu_speedup']}x in CPU time)", target["speedup"] >= TARGET_SPEEDUP, machine
        )
    report = {
        "benchmark": "batch",
        "model": f"checkpoint {args.checkpoint}",
        "rounds": rounds,
        "threads": args.threads,
        "machine": machine,
        "target": {"symbols": TARGET_SYMBOLS, "speedup": TARGET_SPEEDUP, "verdict": met},
        "results": results,
    }
    print(markdown(report))
    print(f"wrote {write_json(args.json, report)}")
    return 0


def markdown(report: dict) -> str:
    columns = {
        "symbols": "symbols", "batched ticks/s": "batched_ticks_per_s", "sequential ticks/s": "sequential_ticks_per_s",
        "speedup": "speedup", "CPU-time speedup": "cpu_speedup", "step p50 ms": "batch_step_p50_ms",
        "step p99 ms": "batch_step_p99_ms",
    }
    title = "Batched ticks (update_many) vs one update per symbol"
    return markdown_table(title, columns, list(report["results"].values()), report["machine"])
