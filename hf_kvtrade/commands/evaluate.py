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
    parser.add_argument("--context-lengths", type=_lengths, default="64,128,256,512,1024", metavar="L1,L2,...",
                        help="also report the model's NLL under policy windows of these lengths, up to the checkpoint's "
                             "window ('none' to skip; default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    parser.add_argument("--update-card", action="store_true", help="write the table into the checkpoint's model card")
    parser.set_defaults(func=run)  # fmt: skip


def _lengths(text: str) -> list[int]:
    import argparse

    from ..benchmarks._common import context_list

    lengths = [] if text == "none" else list(context_list(text))
    if any(length < 4 for length in lengths):
        raise argparse.ArgumentTypeError(f"context lengths must be at least 4 tokens, got {text!r}")
    return lengths


def run(args) -> int:
    from ..benchmarks._common import write_json
    from ..data.bundled import series_info
    from ..evaluation import context_length_curve, evaluate, format_table, heldout_series_names, update_model_card
    from ..forecasting import Forecaster
    from .train import select_frames

    forecaster = Forecaster.from_pretrained(args.checkpoint)
    frames, _ = select_frames("all" if args.series == "heldout" else args.series, args.data_file)
    if args.series == "heldout":
        markets = {name: series_info(name).market for name in frames}
        frames = {name: frames[name] for name in heldout_series_names(frames, markets)}
    results = evaluate(frames, forecaster.model, forecaster.tokenizer)
    results.update(checkpoint=args.checkpoint, series_selection=args.series)
    print(format_table(results))
    window = forecaster.context_policy.window
    if beyond := [length for length in args.context_lengths if length > window]:
        print(f"context lengths {beyond} skipped: beyond the checkpoint's {window}-token window, positions it never learned")
    if lengths := [length for length in args.context_lengths if length <= window]:
        curve = context_length_curve(frames, forecaster.model, forecaster.tokenizer, lengths)
        results["context_length_nll"] = curve
        print("context window -> NLL: " + ", ".join(f"{length}: {nll:.4f}" for length, nll in curve.items()))
    if args.json:
        print(f"wrote {write_json(args.json, results)}")
    if args.update_card:
        # The shipped checkpoint's own card names no machine-specific path: the default finds it wherever installed.
        checkpoint = "" if args.checkpoint == str(SHIPPED_CHECKPOINT) else f" --checkpoint {args.checkpoint}"
        command = f"kvtrade evaluate{checkpoint} --series {args.series} --update-card"
        print(f"updated {update_model_card(args.checkpoint, results, command)}")
    return 0
