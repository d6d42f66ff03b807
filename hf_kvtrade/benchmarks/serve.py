"""vLLM vs Transformers: sampled-forecast throughput, and time to first token for a new bar, prefix cached vs cold.

(a) Throughput: forecasts per second for SYMBOLS price histories of BARS bars, each forecast being PATHS sampled
paths of STEPS bars; Transformers batched `generate` (one symbol's paths per batch, the history prefilled once
and its cache repeated, as `Forecaster.sample_paths` does) against vLLM's offline engine (all symbols in one
batch, paged KV cache, the paths of a symbol sharing its prompt's KV blocks).
(b) Prefix caching: latency of a one-token request for the history plus one new bar, when the history's KV blocks
are in vLLM's prefix cache (warm, the streaming case) and when the cache was just reset (cold).

Histories are seeded geometric random walks: the cost of a forecast does not depend on the prices.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..presets import SHIPPED_CHECKPOINT

QUICK_SYMBOLS = 4


def add_arguments(parser) -> None:
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument(
        "--checkpoint",
        default=str(SHIPPED_CHECKPOINT),
        help="model folder (default: %(default)s; a random small-preset model when it does not exist)",
    )
    parser.add_argument("--symbols", type=int, default=64)
    parser.add_argument("--bars", type=int, default=2048, help="history length per symbol (default: %(default)s)")
    parser.add_argument("--paths", type=int, default=16, help="sampled paths per forecast (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="forecast horizon in bars (default: %(default)s)")
    parser.add_argument("--ticks", type=int, default=8, help="new-bar requests timed, warm and cold each")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SYMBOLS} symbols instead of --symbols")
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (slower start)")


def run(args) -> int:
    # The vLLM engine runs in a spawned process; `kvtrade` is a console script, so the spawn guard holds.
    import numpy as np
    import torch

    from ..client import OfflineForecaster
    from ..forecasting import Forecast, Forecaster
    from ._common import machine_info, percentile_ms, write_json

    symbols = QUICK_SYMBOLS if args.quick else args.symbols
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint, model_note = _checkpoint(Path(args.checkpoint), Path(scratch))
        print(f"model: {model_note}", flush=True)
        rng = np.random.default_rng(0)
        histories = [100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, args.bars))) for _ in range(symbols)]

        hf = Forecaster.from_pretrained(checkpoint)
        vllm = OfflineForecaster(checkpoint, enforce_eager=not args.compile)

        def hf_forecasts():
            forecasts = []
            for prices in histories:
                input_ids = hf.encode_context(prices)
                paths = hf.sample_paths(input_ids, args.steps, args.paths)
                forecasts.append(Forecast.from_paths(hf.tokenizer.decode(paths), prices[-1], (0.05, 0.5, 0.95)))
            return forecasts

        def vllm_forecasts():
            # A cold cache: the histories were seen in the warm-up, and must be prefilled again like HF's.
            vllm.llm.reset_prefix_cache()
            return vllm.predict_batch(histories, args.steps, args.paths, quantiles=(0.05, 0.5, 0.95))

        print("warming up", flush=True)
        with torch.inference_mode():
            hf.predict(histories[0][:64], horizon=2, num_samples=2)
        vllm.predict_batch([prices[:64] for prices in histories], horizon=args.steps, num_samples=args.paths)

        print(f"throughput: {symbols} symbols x {args.bars} bars x {args.paths} paths x {args.steps} steps", flush=True)
        with torch.inference_mode():
            hf_seconds = _timed(hf_forecasts)
        print(f"  transformers generate: {hf_seconds:.1f} s", flush=True)
        vllm_seconds = _timed(vllm_forecasts)
        print(f"  vllm offline engine:   {vllm_seconds:.1f} s", flush=True)

        cold, warm = _new_bar_latencies(vllm, histories[0], args.ticks)
        vllm.llm.llm_engine.engine_core.shutdown()

    throughput = {
        "hf_forecasts_per_s": symbols / hf_seconds,
        "vllm_forecasts_per_s": symbols / vllm_seconds,
        "ratio": hf_seconds / vllm_seconds,
    }
    prefix = {
        "cold_ms": percentile_ms(cold),
        "warm_ms": percentile_ms(warm),
        "ratio": float(np.median(warm) / np.median(cold)),
    }
    payload = {
        "throughput": throughput,
        "prefix": prefix,
        "setup": {
            "model": model_note,
            "symbols": symbols,
            "bars": args.bars,
            "paths": args.paths,
            "steps": args.steps,
            "ticks": args.ticks,
            "vllm_compiled": args.compile,
            "hf_batch": f"{args.paths} paths of one symbol per generate call",
            "latency_statistic": "median",
        },
        "machine": machine_info(),
    }
    write_json(args.json, payload)
    print(
        f"throughput: HF {throughput['hf_forecasts_per_s']:.3f}/s, vLLM {throughput['vllm_forecasts_per_s']:.3f}/s, "
        f"vLLM/HF = {throughput['ratio']:.1f}x (target >= 3x)\n"
        f"new bar: cold {prefix['cold_ms']:.1f} ms, warm {prefix['warm_ms']:.1f} ms, "
        f"warm/cold = {prefix['ratio']:.3f} (target <= 0.1)\nwrote {args.json}"
    )
    return 0


def _checkpoint(path: Path, scratch: Path) -> tuple[Path, str]:
    """The given checkpoint, or a random small-preset model saved to ``scratch`` when there is none."""
    if (path / "config.json").exists():
        return path, str(path)
    import torch

    from ..forecasting import Forecaster
    from ..modeling_kvtrade import KVTradeForCausalLM
    from ..presets import load_preset

    torch.manual_seed(0)
    Forecaster(KVTradeForCausalLM(load_preset("small"))).save_pretrained(scratch / "kvtrade-small-random")
    return scratch / "kvtrade-small-random", f"random small preset ({path} does not exist)"


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _new_bar_latencies(vllm, prices, ticks: int) -> tuple[list[float], list[float]]:
    """Seconds to the first token of a request for ``prices[: n + 1]``, cold and with ``prices[:n]`` cached."""
    from vllm import SamplingParams

    one_token = SamplingParams(max_tokens=1)
    cold, warm = [], []
    for tick in range(ticks):
        history = vllm.encode_context(prices[: len(prices) - ticks + tick])
        with_new_bar = vllm.encode_context(prices[: len(prices) - ticks + tick + 1])
        vllm.llm.reset_prefix_cache()
        cold.append(_timed(lambda: vllm.generate([with_new_bar], one_token)))
        vllm.llm.reset_prefix_cache()
        vllm.generate([history], one_token)
        warm.append(_timed(lambda: vllm.generate([with_new_bar], one_token)))
    return cold, warm
