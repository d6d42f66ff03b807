"""Attention map of the shipped model on a real series: which past bars the next-bar forecast attends to.

Eager attention returns its softmax weights (``output_attentions=True``), averaged here over every head of every
layer, over the context the checkpoint's context policy gives the next forecast. The row of the last position is
what the next-bar forecast reads, indexed by lag (0 is the latest bar).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import SHIPPED_CHECKPOINT
from ._common import machine_info, markdown_table, write_json

SUMMARY_LAGS = (1, 5, 20, 60)


def measure(checkpoint: str | Path = SHIPPED_CHECKPOINT, series: str = "sp500", out_dir: str | Path | None = None):
    """The averaged ``map`` (rows are query positions) over the context the next forecast of ``series`` reads.

    Also ``weights_by_lag`` (its last row, reversed), the attention mass within the last few bars, the weighted mean
    lag and the weight on the window's first token (attention sinks gather there). With ``out_dir``, also writes
    ``attention_map.png`` there.
    """
    import torch

    from ..data import load_series
    from ..forecasting import Forecaster

    forecaster = Forecaster.from_pretrained(checkpoint, attn_implementation="eager")
    frame = load_series(series)
    input_ids = forecaster.encode_context(frame["close"].to_numpy())
    context_length = input_ids.shape[1]
    # The token of bar k is the return that ends on it, so the context's tokens are the last context_length bars.
    window = frame.iloc[-context_length:]
    with torch.inference_mode():
        attentions = forecaster.model(input_ids=input_ids, output_attentions=True).attentions
    attention_map = torch.stack(attentions).mean(dim=(0, 1, 2)).double().numpy()  # layers, batch, heads
    weights_by_lag = attention_map[-1, ::-1].copy()
    result = {
        "benchmark": "attention_map",
        "source": f"checkpoint {checkpoint}",
        "series": series,
        "context_length": context_length,
        "first_bar": window.index[0].isoformat(),
        "last_bar": window.index[-1].isoformat(),
        "num_layers": len(attentions),
        "num_heads": attentions[0].shape[1],
        "mass_within_last": {str(lag): float(weights_by_lag[:lag].sum()) for lag in SUMMARY_LAGS},
        "mean_lag": float(weights_by_lag @ np.arange(context_length)),
        "first_token_weight": float(attention_map[-1, 0]),
        "uniform_weight": 1.0 / context_length,
        "weights_by_lag": weights_by_lag,
        "map": attention_map,
        "machine": machine_info("cpu"),
    }
    if out_dir is not None:
        result["plot"] = str(plot(result, window, Path(out_dir) / "attention_map.png"))
    return result


def plot(result: dict, window, path: Path) -> Path:
    """Three panels: the prices of the window, the next forecast's weight on each bar, the full averaged map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = window.index
    figure, (prices, weights, heatmap) = plt.subplots(
        3, 1, figsize=(10, 11), gridspec_kw={"height_ratios": [1, 1, 2.2]}, constrained_layout=True
    )
    prices.plot(bars, window["close"].to_numpy(), color="black", linewidth=1)
    prices.set(ylabel="close", title=f"{result['series']}: attention of the next-bar forecast ({result['source']})")
    weights.bar(bars, result["map"][-1], width=(bars[-1] - bars[0]) / len(bars), color="tab:blue")
    weights.axhline(result["uniform_weight"], color="gray", linestyle="--", linewidth=1, label="uniform")
    weights.set(yscale="log", ylabel="attention weight")
    weights.legend(loc="upper left")
    image = heatmap.imshow(
        np.log10(np.maximum(result["map"], 1e-6)), cmap="viridis", aspect="auto", interpolation="nearest"
    )
    heatmap.set(
        xlabel="key position (bar)",
        ylabel="query position (bar)",
        title=f"log10 attention, mean over {result['num_heads']} heads x {result['num_layers']} layers",
    )
    figure.colorbar(image, ax=heatmap)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def add_arguments(parser) -> None:
    parser.add_argument(
        "--out", default="out/bench/attention_map", help="folder of attention_map.png and .json (default: %(default)s)"
    )
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="model folder (default: %(default)s)")
    parser.add_argument("--series", default="sp500", help="bundled series (default: %(default)s)")


def run(args) -> int:
    result = measure(args.checkpoint, args.series, out_dir=args.out)
    summary = {key: value for key, value in result.items() if key != "map"}
    summary["weights_by_lag"] = result["weights_by_lag"].tolist()
    write_json(Path(args.out) / "attention_map.json", summary)
    print(f"{result['source']}, {result['series']} ({result['first_bar'][:10]} .. {result['last_bar'][:10]})")
    print(markdown(summary))
    print(f"wrote {result['plot']} and {Path(args.out) / 'attention_map.json'}")
    return 0


def markdown(result: dict) -> str:
    mass = result["mass_within_last"]
    title = f"Where the next forecast looks ({result['series']}, {result['context_length']} bars)"
    columns = {"attention mass on the last N bars": lambda _: "share", **{lag: lag for lag in mass}}
    columns["mean lag"] = "mean_lag"
    table = markdown_table(title, columns, [{**mass, "mean_lag": result["mean_lag"]}], result["machine"])
    return table + "\n\n![attention map](attention_map/attention_map.png)"
