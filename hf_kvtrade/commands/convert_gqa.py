"""`kvtrade convert-gqa`: pool a checkpoint's key/value heads into fewer groups (MHA -> GQA/MQA), optionally uptrain."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import SHIPPED_CHECKPOINT

REPORT_FILE = "conversion.json"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-gqa", help="mean-pool key/value heads into K groups, optionally uptrain, and save the checkpoint"
    )
    parser.add_argument("source", metavar="SRC", nargs="?", default=str(SHIPPED_CHECKPOINT),
                        help="checkpoint folder to convert (default: the shipped model)")
    parser.add_argument("destination", metavar="DST", nargs="?", default="out/convert-gqa/kvtrade-small-mqa",
                        help="folder for the converted checkpoint (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=1,
                        help="key/value heads after conversion, dividing SRC's (default: %(default)s, multi-query)")
    parser.add_argument("--uptrain-steps", type=int, default=0, help="Trainer steps after pooling (default: none)")
    parser.add_argument("--series", default="all", help="comma-separated bundled series for uptraining and the test NLL, or 'all'")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..conversion import convert_checkpoint
    from .train import select_frames

    frames, _ = select_frames(args.series, [])
    report = convert_checkpoint(
        args.source,
        args.destination,
        args.kv_heads,
        frames,
        uptrain_steps=args.uptrain_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    Path(args.destination, REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    heads = f"{report['source_kv_heads']} -> {report['kv_heads']} kv heads"
    print(f"{heads} ({report['num_attention_heads']} query heads); test NLL over {report['num_test_bars']} bars:")
    for stage, nll in report["nll"].items():
        print(f"  {stage:<10} {nll:.4f} nats/bar")
    print(f"saved {args.destination} (report: {REPORT_FILE})")
    return 0
