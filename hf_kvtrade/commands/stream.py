"""`kvtrade stream`: replays a bundled series tick by tick through the streaming engine, as a live feed would."""

from __future__ import annotations

from ..checkpoint import SHIPPED_CHECKPOINT


def register(subparsers) -> None:
    parser = subparsers.add_parser("stream", help="replay a bundled series bar by bar, printing each forecast")
    parser.add_argument("--data", default="sp500", help="bundled series name (default: %(default)s; see hf_kvtrade.data)")
    parser.add_argument("--limit", type=int, help="stop after N bars")
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="model folder (default: %(default)s)")
    parser.add_argument("--policy", default="full", help="cache policy of the streaming engine")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one-token steps prefer 1)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..data import bundled_series_names, load_series
    from ..checkpoint import load_checkpoint
    from ..streaming import StreamingForecaster

    if args.data not in bundled_series_names():
        raise SystemExit(f"unknown series {args.data!r}; bundled series are {bundled_series_names()}")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be at least 1, got {args.limit}")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint)
    print(f"model: checkpoint {args.checkpoint}")
    engine = StreamingForecaster(model, tokenizer, cache_policy=args.policy)
    for timestamp, close in load_series(args.data)["close"].iloc[: args.limit].items():
        tick = engine.update(args.data, {"close": close, "timestamp": timestamp})
        low, high = tick.forecast.price_quantiles[0, [0, -1]]
        print(
            f"{timestamp}  close {close:10.4f}  P(up) {tick.prob_up:.3f}  E[r] {tick.mean_return:+.5f}  "
            f"90% [{low:.4f}, {high:.4f}]  {tick.signal.name:7s}  {tick.latency_ms:6.2f} ms"
        )
    stats = engine.latency_stats()
    print(f"{stats['ticks']} ticks  p50 {stats['p50_ms']:.2f} ms  p99 {stats['p99_ms']:.2f} ms  cache {stats['cache_bytes']} bytes")
    return 0
