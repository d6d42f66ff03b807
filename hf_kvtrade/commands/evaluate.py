"""`kvtrade evaluate`: the model against random-walk, GARCH(1,1)-t and unconditional baselines on held-out bars."""

from __future__ import annotations

from ..checkpoint import SHIPPED_CHECKPOINT


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="score next-bar forecasts against baselines on the test period")
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="model folder (default: %(default)s)")
    parser.add_argument("--series", default="heldout",
                        help="comma-separated bundled series, 'all', or 'heldout': those whose test period starts after "
                             "every same-frequency series' training period (default: %(default)s)")
    parser.add_argument("--data-file", action="append", default=[], metavar="PATH",
                        help="also evaluate on the final period of this CSV/Parquet OHLCV file (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    parser.add_argument("--update-card", action="store_true", help="write the table into the checkpoint's model card")
    parser.set_defaults(func=run)  # fmt: skip


def run(args) -> int:
    import json

    from ..evaluation import evaluate, format_table, heldout_series_names, update_model_card
    from ..forecasting import Forecaster
    from .train import select_frames

    forecaster = Forecaster.from_pretrained(args.checkpoint)
    frames, _ = select_frames("all" if args.series == "heldout" else args.series, args.data_file)
    if args.series == "heldout":
        from ..data.bundled import series_info

        markets = {name: series_info(name).market for name in frames}
        frames = {name: frames[name] for name in heldout_series_names(frames, markets)}
    results = evaluate(frames, forecaster.model, forecaster.tokenizer)
    results["checkpoint"] = args.checkpoint
    results["series_selection"] = args.series
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    if args.update_card:
        command = f"kvtrade evaluate --checkpoint {args.checkpoint} --series {args.series}"
        print(f"updated {update_model_card(args.checkpoint, results, command)}")
    return 0
