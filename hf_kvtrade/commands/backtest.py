"""`kvtrade backtest`: walk-forward backtest of the streaming forecaster on bundled held-out data.

Every series is traded by both signal rules on the same forecasts (``model``: the all-or-nothing SignalRule;
``model_vol_target``: the VolTargetRule), next to the same baselines."""

from __future__ import annotations

from ..checkpoint import SHIPPED_CHECKPOINT

DEFAULT_SERIES = ("sp500", "nasdaq", "eurusd_h1", "btc_usd_1h")
DEFAULT_PORTFOLIO = ("skfolio_aapl", "skfolio_jpm", "skfolio_xom", "skfolio_jnj")


def register(subparsers) -> None:
    parser = subparsers.add_parser("backtest", help="walk-forward backtest with baselines; writes JSON and PNGs")
    parser.add_argument("--out", default="out/backtest",
                        help="folder for report.json and the plots (default: %(default)s)")
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="model folder (default: %(default)s)")
    parser.add_argument("--series", nargs="+", default=list(DEFAULT_SERIES), help="bundled series traded one by one")
    parser.add_argument(
        "--portfolio", nargs="*", default=list(DEFAULT_PORTFOLIO), help="bundled series of the multi-asset book"
    )
    parser.add_argument("--cost", type=float, default=2e-4, help="one-way transaction cost (default: %(default)s)")
    parser.add_argument("--prob-threshold", type=float, default=0.52, help="P(up) needed to go long")
    parser.add_argument("--long-only", action="store_true", help="never go short (both rules)")
    parser.add_argument("--target-vol", type=float,
                        help="per-bar volatility target of the vol-targeting rule (default: each series' std "
                             "before its test period, as the GARCH baseline)")
    parser.add_argument("--max-leverage", type=float, default=2.0, help="position cap of the vol-targeting rule")
    parser.add_argument("--vol-fallback", choices=("long", "flat"), default="long",
                        help="vol-targeting position when P(up) is too close to 1/2 to pay the costs "
                             "(default: %(default)s, the vol-scaled long)")  # fmt: skip
    parser.add_argument("--warmup", type=int,
                        help="bars before the test period to prime each session (default: the checkpoint's context window)")
    parser.add_argument("--policy", default="full", help="cache policy of the streaming engine")
    parser.add_argument("--limit", type=int, help="trade only the first N test bars of each series (quick runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one-token steps prefer 1)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import json

    import torch

    from ..backtest import run_backtest
    from ..checkpoint import load_checkpoint
    from ..context import ContextPolicy
    from ..signals import SignalRule, VolTargetRule

    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint)
    description = f"checkpoint {args.checkpoint}"
    print(f"model: {description}")
    costs = {"transaction_cost": args.cost, "allow_short": not args.long_only}
    report = run_backtest(
        model,
        tokenizer,
        args.out,
        series=list(args.series),
        portfolio=list(args.portfolio),
        rule=SignalRule(prob_threshold=args.prob_threshold, **costs),
        vol_rule=VolTargetRule(
            target_vol=args.target_vol, max_leverage=args.max_leverage, fallback=args.vol_fallback, **costs
        ),
        warmup=ContextPolicy.from_config(model.config).window if args.warmup is None else args.warmup,
        cache_policy=args.policy,
        limit=args.limit,
        model_description=description,
    )
    for name, result in report["series"].items():
        print(f"\n{name} ({result['test_start']} .. {result['test_end']}, {result['bars']} bars, "
              f"vol target {result['vol_target']:.5f} per bar)")  # fmt: skip
        _print_metrics(result["metrics"])
    if "multi_asset" in report:
        print(f"\nmulti-asset {report['multi_asset']['symbols']}")
        _print_metrics(report["multi_asset"]["metrics"])
    print(f"\nlatency {json.dumps({k: round(v, 3) for k, v in report['latency'].items()})}")
    print(f"wrote {args.out}/report.json and {len(report['plots'])} plots")
    return 0


def _print_metrics(strategies: dict[str, dict]) -> None:
    def fmt(value):
        return "   n/a" if value is None else f"{value:6.2f}"

    for strategy, m in strategies.items():
        print(f"  {strategy:18s} total {m['total_return']:+7.2%}  sharpe {fmt(m['sharpe'])}  "
              f"sortino {fmt(m['sortino'])}  maxdd {m['max_drawdown']:7.2%}  win {fmt(m['win_rate'])}  "
              f"turnover {m['turnover']:7.1f}")
