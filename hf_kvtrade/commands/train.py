"""`kvtrade train`: trains a preset on bundled and/or user price series with the Transformers Trainer."""

from __future__ import annotations

import shlex

# The defaults reproduce the shipped checkpoint: `kvtrade train` with no options is its recipe.
SHIPPED_RECIPE = {
    "context_length": 1024,
    "synthetic_series": 6000,
    "synthetic_steps": 700,
    "synthetic_learning_rate": 1e-3,
    "max_steps": 500,
    "learning_rate": 3e-4,
}
# Namespace entries that are not training options (each option's dest is its flag in snake case).
NOT_RECORDED = {"command", "func", "push_to_hub"}


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model on price series and save a checkpoint")
    parser.add_argument("--preset", default="small", help="config preset: tiny, small, base or a JSON path (default: %(default)s)")
    parser.add_argument("--attention", default="gqa", choices=("mha", "gqa", "mqa"), help="attention flavour (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, help="number of KV heads (overrides --attention)")
    parser.add_argument("--series", default="all", help="comma-separated bundled series, or 'all' (default: %(default)s)")
    parser.add_argument("--data-file", action="append", default=[], metavar="PATH",
                        help="a CSV or Parquet OHLCV file with 'timestamp' and 'close' columns (repeatable)")
    parser.add_argument("--output-dir", default="checkpoints/kvtrade-small")
    parser.add_argument("--context-length", type=int, default=SHIPPED_RECIPE["context_length"],
                        help="tokens per training window (default: %(default)s)")
    parser.add_argument("--context-stride", type=int,
                        help="tokens the context anchor moves at a rebase, saved in the checkpoint (default: half the context length)")
    parser.add_argument("--synthetic-series", type=int, default=SHIPPED_RECIPE["synthetic_series"],
                        help="synthetic series (one window each) for the pretraining stage (default: %(default)s)")
    parser.add_argument("--synthetic-steps", type=int, default=SHIPPED_RECIPE["synthetic_steps"],
                        help="optimizer steps of the synthetic stage; 0 trains on the real series only (default: %(default)s)")
    parser.add_argument("--synthetic-learning-rate", type=float, default=SHIPPED_RECIPE["synthetic_learning_rate"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=SHIPPED_RECIPE["max_steps"], help="optimizer steps of the real stage")
    parser.add_argument("--learning-rate", type=float, default=SHIPPED_RECIPE["learning_rate"], help="peak learning rate of the real stage")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the saved folder to this Hub repository")
    parser.set_defaults(func=run)  # fmt: skip


def reproducible_command(args) -> str:
    """The command line with every training option spelled out, as recorded in the model card."""
    words = ["kvtrade", "train"]
    for name, value in vars(args).items():
        if name not in NOT_RECORDED and value is not None:
            flag = "--" + name.replace("_", "-")
            words += [word for item in (value if isinstance(value, list) else [value]) for word in (flag, str(item))]
    return shlex.join(words)


def select_frames(series: str, data_files: list[str]) -> tuple[dict, list[dict]]:
    """Price frames by name, with a description of each source for the model card."""
    from pathlib import Path

    from ..data import bundled_series_names, load_series, read_ohlcv, series_metadata

    names = [] if series == "none" else bundled_series_names() if series == "all" else series.split(",")
    frames = {name: load_series(name) for name in names}
    sources = [series_metadata(name) for name in names]
    for path in data_files:
        frame = read_ohlcv(path)
        frames[Path(path).name] = frame
        sources.append({
            "name": Path(path).name, "description": "user file", "package": "-", "frequency": "-",
            "start": frame.index[0].isoformat(), "end": frame.index[-1].isoformat(),
        })  # fmt: skip
    return frames, sources


def run(args) -> int:
    import torch

    from ..presets import load_preset
    from ..training import SyntheticStage, push_to_hub, train, write_model_card

    config = load_preset(args.preset, attention=args.attention, kv_heads=args.kv_heads)
    frames, sources = select_frames(args.series, args.data_file)
    result = train(
        config,
        frames,
        args.output_dir,
        window_length=args.context_length,
        context_stride=args.context_stride,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        eval_steps=args.eval_steps,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        synthetic=SyntheticStage(args.synthetic_series, args.synthetic_steps, args.synthetic_learning_rate, args.seed),
    )
    write_model_card(result, reproducible_command(args), sources)
    print(
        f"validation loss {result.initial_validation_loss:.4f} -> {result.validation_loss:.4f} "
        f"(best step {result.best_step}) in {result.train_seconds / 60:.1f} min; saved to {result.output_dir}"
    )
    if args.push_to_hub:
        print(f"pushed: {push_to_hub(args.output_dir, args.push_to_hub)}")
    return 0
