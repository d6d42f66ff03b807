"""`kvtrade demo`: the main job on real data (S&P 500, BTC/USD hourly) with the shipped model: forecast, stream, backtest."""

from __future__ import annotations

from ..checkpoint import SHIPPED_CHECKPOINT


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="forecast, stream and backtest the shipped model on bundled data")
    parser.add_argument("--out", default="out", help="folder for the backtest report and plots (default: %(default)s)")
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="model folder (default: %(default)s)")
    parser.add_argument("--stream-bars", type=int, default=40, help="bars replayed by the streaming step")
    parser.set_defaults(func=run)


def run(args) -> int:
    # Each step is the real subcommand, so the demo shows exactly what a user would type.
    from ..cli import main
    from ..orderbook.training import SHIPPED_ORDERBOOK_CHECKPOINT

    steps = [
        ("Next-day forecast of the S&P 500 (exact next-token distribution)", ["forecast", "--series", "sp500"]),
        ("Next-hour forecast of BTC/USD", ["forecast", "--series", "btc_usd_1h"]),
        ("BTC/USD five hours ahead from 256 sampled paths",
         ["forecast", "--series", "btc_usd_1h", "--horizon", "5", "--num-samples", "256"]),
        ("Replaying hourly BTC/USD bar by bar through the streaming engine",
         ["stream", "--data", "btc_usd_1h", "--limit", str(args.stream_bars)]),
        ("Walk-forward backtest on the held-out test periods", ["backtest", "--out", f"{args.out}/backtest"]),
        ("Replaying the first half-minute of the Bitstamp BTC/USD order book with next-mid-move forecasts",
         ["orderbook", "--limit-events", "11000", "--print-every", "50", "--out", f"{args.out}/orderbook",
          "--checkpoint", str(SHIPPED_ORDERBOOK_CHECKPOINT)]),
    ]
    for title, argv in steps:
        print(f"\n=== {title}\n$ kvtrade {' '.join(argv)}", flush=True)
        if "--checkpoint" not in argv:
            argv = [*argv, "--checkpoint", args.checkpoint]
        status = main(argv)
        if status:
            return status
    print(f"\nPlots and the JSON report are in {args.out}/backtest/, the order-book plot in {args.out}/orderbook/")
    return 0
