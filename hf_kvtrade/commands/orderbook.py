"""`kvtrade orderbook [replay|evaluate|train]`: the Bitstamp BTC/USD capture through the order-book model (replay
with forecasts and a plot, the comparison with the baselines, or retraining the shipped checkpoint)."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("orderbook", help="replay the BTC/USD order-book capture with next-mid-move forecasts")
    parser.add_argument("action", nargs="?", default="replay", choices=("replay", "evaluate", "train"),
                        help="what to do (default: %(default)s)")
    parser.add_argument("--checkpoint", help="order-book model folder (default: the shipped kvtrade-orderbook)")
    parser.add_argument("--cache", default="int8", help="KV cache policy of the analyzer (default: %(default)s)")
    parser.add_argument("--limit-events", type=int, help="replay only the first N order events")
    parser.add_argument("--speed", type=float, help="replay at N times the events' own pace (default: as fast as possible)")
    parser.add_argument("--print-every", type=int, default=600, help="print every N-th forecast (default: %(default)s, one a minute)")
    parser.add_argument("--plot-minutes", type=float, default=3.0, help="minutes of the test period in the plot (default: %(default)s)")
    parser.add_argument("--out", default="out/orderbook", help="folder for the plot (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--output-dir", default="checkpoints/kvtrade-orderbook", help="train: where to save (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=400, help="train: optimizer steps (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..orderbook.capture import load_orders, load_trades
    from ..orderbook.training import SHIPPED_ORDERBOOK_CHECKPOINT

    torch.set_num_threads(args.threads)
    args.checkpoint = args.checkpoint or str(SHIPPED_ORDERBOOK_CHECKPOINT)
    orders, trades = load_orders(), load_trades()
    return (_replay if args.action == "replay" else _compare)(args, orders, trades)


def _replay(args, orders, trades) -> int:
    import time

    import numpy as np
    import pandas as pd

    from ..benchmarks.orderbook import first_events
    from ..orderbook.analyzer import StreamingOrderBookAnalyzer
    from ..orderbook.plot import plot_orderbook_forecasts
    from ..orderbook.training import load_orderbook_model, split_by_time

    model, tokenizer = load_orderbook_model(args.checkpoint)
    orders, trades = first_events(orders, trades, args.limit_events)
    analyzer = StreamingOrderBookAnalyzer(model, tokenizer, cache_policy=args.cache)
    print(f"replaying {len(orders):,} order events and {len(trades):,} trades through {args.checkpoint} "
          f"({args.cache} cache, {analyzer.clock.clock_ms} ms ticks, context window {analyzer.policy.window} tokens)")  # fmt: skip
    print(f"{'tick (UTC)':>23} {'mid':>10} {'imbal':>6} {'P(up)':>6} {'P(down)':>7} {'E[move]':>8} {'1%-99% next mid':>21}")
    forecasts, started = [], time.perf_counter()
    for forecast in analyzer.replay(orders, trades, speed=args.speed):
        forecasts.append(forecast)
        if len(forecasts) % args.print_every == 0:
            low, high = forecast.mid_quantiles((0.01, 0.99))
            print(f"{forecast.time.strftime('%Y-%m-%d %H:%M:%S.%f')[:-5]:>23} {forecast.mid:10.1f} {forecast.imbalance:6.2f} "
                  f"{forecast.prob_up:6.3f} {forecast.prob_down:7.3f} {forecast.expected_move:8.3f} {low:10.1f}-{high:10.1f}")  # fmt: skip
    elapsed, events = time.perf_counter() - started, len(orders) + len(trades)
    latencies = np.array([f.latency_s for f in forecasts]) * 1e3
    print(f"{len(forecasts):,} ticks in {elapsed:.1f} s ({events / elapsed:,.0f} events/s, {len(forecasts) / elapsed:,.0f} ticks/s); "
          f"model latency per tick p50 {np.percentile(latencies, 50):.2f} ms, p99 {np.percentile(latencies, 99):.2f} ms; "
          f"{analyzer.rebases} rebases; cache {analyzer.cache_bytes():,} bytes")  # fmt: skip
    if len(forecasts) > 2:
        try:
            test_start = split_by_time(pd.DataFrame(index=pd.to_datetime([f.tick_ms for f in forecasts], unit="ms")))[1]
        except ValueError:  # a replay shorter than the three periods: plot from its start
            test_start = 0
        end = min(len(forecasts), test_start + int(args.plot_minutes * 60_000 / analyzer.clock.clock_ms))
        path = plot_orderbook_forecasts(forecasts[test_start:end], trades, f"{args.out}/orderbook_forecast.png")
        print(f"plot: {path}")
    return 0


def _compare(args, orders, trades) -> int:
    """``evaluate`` prints the comparison; ``train`` first trains into ``--output-dir`` and saves the comparison
    there with the model card."""
    import json
    from pathlib import Path

    from ..orderbook import features
    from ..orderbook.evaluation import compare, format_report
    from ..orderbook.training import load_orderbook_model, train_orderbook_model, write_model_card

    frame = features(orders, trades)
    if args.action == "train":
        run = train_orderbook_model(frame, args.output_dir, max_steps=args.max_steps)
        args.checkpoint = args.output_dir
    report = compare(frame, *load_orderbook_model(args.checkpoint))
    if args.action == "train":
        command = f"kvtrade orderbook train --max-steps {args.max_steps}"
        evaluation = {"command": command, "training": vars(run), "report": report}
        Path(args.output_dir, "evaluation.json").write_text(json.dumps(evaluation, indent=1))
        write_model_card(args.output_dir, command, vars(run), format_report(report))
        print(f"validation loss {run.initial_validation_loss:.4f} -> {run.validation_loss:.4f} (best step "
              f"{run.best_step}) in {run.train_seconds / 60:.1f} min, {run.num_parameters:,} parameters; "
              f"saved to {args.output_dir}")
    print(format_report(report))
    if args.action == "evaluate":
        print(json.dumps(report, indent=1))
    return 0
