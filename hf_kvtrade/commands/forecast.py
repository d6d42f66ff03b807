"""`kvtrade forecast`: one forecast from a checkpoint on a bundled series or a CSV of prices."""

from __future__ import annotations

from ..checkpoint import SHIPPED_CHECKPOINT


def register(subparsers) -> None:
    parser = subparsers.add_parser("forecast", help="forecast the next bars of a price series")
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="model folder (default: %(default)s)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--series", default="sp500", help="bundled series to forecast (default: %(default)s)")
    source.add_argument("--csv", help="CSV file with a price column, instead of a bundled series")
    parser.add_argument("--column", default="close", help="price column of --csv (default: %(default)s)")
    parser.add_argument("--horizon", type=int, default=1)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import pandas as pd

    from ..forecasting import Forecaster

    if args.csv:
        frame = pd.read_csv(args.csv)
        if args.column not in frame.columns:
            raise SystemExit(f"{args.csv} has no column {args.column!r}; columns are {list(frame.columns)}")
        prices = frame[args.column].to_numpy(dtype=np.float64)
    else:
        from ..data import load_series

        prices = load_series(args.series).close.to_numpy()
    forecaster = Forecaster.from_pretrained(args.checkpoint)
    forecast = forecaster.predict(prices, horizon=args.horizon, num_samples=args.num_samples, seed=args.seed)
    print(f"last price {forecast.last_price:.4f}")
    for step, (prob_up, prices) in enumerate(zip(forecast.prob_up, forecast.price_quantiles), start=1):
        quantiles = "  ".join(f"q{level:.2f}={price:.4f}" for level, price in zip(forecast.quantile_levels, prices))
        print(f"t+{step}: P(up)={prob_up:.3f}  {quantiles}")
    return 0
