"""Sustained throughput of the streaming order-book analyzer on the Bitstamp capture, with headroom over its peak rate.

The capture is replayed as fast as possible through the book alone and the analyzer with the int8 and the full KV
cache, side by side. Headroom is the int8 analyzer's events/s over the capture's busiest second of live events;
the target is 10x, and the same ratio on CPU time is printed beside it. Method and results: docs/orderbook.md.
"""

from __future__ import annotations

from ._common import add_common_arguments, markdown_table, verdict

TARGET_HEADROOM = 10.0
QUICK_EVENTS = 60_000


def add_arguments(parser) -> None:
    add_common_arguments(parser, "orderbook", quick=f"replay the first {QUICK_EVENTS:,} order events", threads=True)
    parser.add_argument("--checkpoint", help="order-book model folder (default: the shipped kvtrade-orderbook)")
    parser.add_argument("--limit-events", type=int, help="replay only the first N order events (default: all)")


def first_events(orders, trades, limit: int | None):
    """The first ``limit`` order events (all of them when None) and the trades up to the last of those."""
    if limit is None:
        return orders, trades
    if limit < 1:
        raise SystemExit("--limit-events must be at least 1")
    orders = orders.iloc[:limit]
    return orders, trades[trades["exchange_timestamp"] <= orders["exchange_timestamp"].iloc[-1]]


def _peak_events_per_second(orders, meta: dict) -> int:
    """The busiest exchange second of the live feed: the snapshot's creates and the recorder's closing deletes of
    every resting order (``meta["synthetic_deleted"]`` rows, all at the last millisecond) are not traffic."""
    import numpy as np

    from ..orderbook.features import snapshot_rows

    live = orders["exchange_timestamp"].to_numpy()[snapshot_rows(orders) : len(orders) - meta["synthetic_deleted"]]
    return int(np.unique(live // 1000, return_counts=True)[1].max())


def _replay_book(orders, trades) -> float:
    """Seconds to replay the events into the book and tick features, without a model."""
    import time

    from ..orderbook.analyzer import merged_events
    from ..orderbook.features import TickClock

    clock, started = TickClock(), time.perf_counter()
    for stamp, is_order, fields in merged_events(orders, trades):
        clock.add_order(*fields, stamp) if is_order else clock.add_trade(*fields, stamp)
    clock.close_tick()
    return time.perf_counter() - started


def run(args) -> int:
    import os
    import time

    import numpy as np
    import torch

    from ..orderbook.analyzer import StreamingOrderBookAnalyzer
    from ..orderbook.capture import load_meta, load_orders, load_trades
    from ..orderbook.training import SHIPPED_ORDERBOOK_CHECKPOINT, load_orderbook_model
    from ._common import machine_info, machine_label, percentile_ms, write_json

    torch.set_num_threads(args.threads)
    args.checkpoint = args.checkpoint or str(SHIPPED_ORDERBOOK_CHECKPOINT)
    orders, trades = load_orders(), load_trades()
    peak = _peak_events_per_second(orders, load_meta())
    limit = QUICK_EVENTS if args.quick and args.limit_events is None else args.limit_events
    orders, trades = first_events(orders, trades, limit)
    model, tokenizer = load_orderbook_model(args.checkpoint)
    machine = machine_info()
    events = len(orders) + len(trades)

    book_seconds = _replay_book(orders, trades)
    rows, probs = {"book and features only": {"seconds": book_seconds, "events_per_s": events / book_seconds}}, {}
    for policy in ("int8", "full"):
        analyzer = StreamingOrderBookAnalyzer(model, tokenizer, cache_policy=policy)
        started, started_cpu = time.perf_counter(), time.process_time()
        forecasts = list(analyzer.replay(orders, trades))
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
        latencies = [forecast.latency_s for forecast in forecasts]
        probs[policy] = np.stack([forecast.probs for forecast in forecasts])
        rows[f"analyzer, {policy} cache"] = {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "events_per_cpu_s": events / cpu_seconds,
            "events_per_s": events / seconds,
            "ticks": len(forecasts),
            "ticks_per_s": len(forecasts) / seconds,
            "p50_tick_ms": percentile_ms(latencies, 50),
            "p99_tick_ms": percentile_ms(latencies, 99),
            "cache_bytes": analyzer.cache_bytes(),
            "context_tokens": analyzer.context_length,
            "rebases": analyzer.rebases,
        }
    int8 = rows["analyzer, int8 cache"]
    headroom, cpu_headroom = int8["events_per_s"] / peak, int8["events_per_cpu_s"] / peak
    load = os.getloadavg()[0]
    payload = {
        "machine": machine,
        "checkpoint": args.checkpoint,
        "order_events": len(orders),
        "trades": len(trades),
        "peak_live_events_per_s": peak,
        "rows": rows,
        "headroom": headroom,
        "headroom_on_cpu_time": cpu_headroom,
        "target_headroom": TARGET_HEADROOM,
        "target_met": headroom >= TARGET_HEADROOM,
        "int8_vs_full_max_prob_difference": float(np.abs(probs["int8"] - probs["full"]).max()),
        "load_average_1min": load,
    }
    print(f"machine: {machine_label(machine)}, load average {load:.1f} at the end")
    print(f"{len(orders):,} order events + {len(trades):,} trades; busiest second of the capture: {peak:,} live events")
    print(f"int8 vs full cache: largest difference of a move probability {payload['int8_vs_full_max_prob_difference']:.2e}")
    print(markdown(payload))  # its headroom line is the target's verdict; its rows name the machine
    print(
        f"on the process's CPU time ({int8['cpu_seconds']:.1f} s): {int8['events_per_cpu_s']:,.0f} events/s, "
        f"{cpu_headroom:.1f}x the peak"
    )
    print(f"wrote {write_json(args.json, payload)}")
    return 0


def markdown(payload: dict) -> str:
    events, peak = payload["order_events"], payload["peak_live_events_per_s"]
    title = f"Order-book replay ({events:,} events, capture peak {peak:,.0f}/s)"
    columns = {
        "path": "path", "seconds": "seconds", "events/s": "events_per_s", "ticks/s": "ticks_per_s",
        "tick p50 ms": "p50_tick_ms", "tick p99 ms": "p99_tick_ms", "cache bytes": "cache_bytes",
    }
    rows = [{"path": path, **row} for path, row in payload["rows"].items()]
    return markdown_table(title, columns, rows, payload["machine"]) + (
        f"\n\nHeadroom over the peak: {payload['headroom']:.1f}x (target {payload['target_headroom']:.0f}x: "
        f"{verdict(payload['target_met'])})."
    )
