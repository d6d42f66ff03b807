"""KV cache policies side by side: bytes held, next-step NLL and step latency of full, int8, int4, sink, selective.

One run, one model, one held-out stream (the test periods of the bundled series, concatenated). Three passes:

1. Bytes: every policy streams the ticks in chunks and reads ``nbytes()`` on the way: the growing caches over
   ``--grow-ticks`` (16k), the bounded sink and selective caches over ``--long-ticks`` (100k). Figures past a
   stream's end are extrapolated linearly from two of its measurements, and the JSON says which.
2. Next-step NLL and step latency over ``--eval-ticks`` ticks fed one at a time, the way a live stream arrives.
   Every policy runs SDPA attention except the selective cache, which needs the weights only eager returns.
   The reference is the full cache, except for the sink cache, whose reference is sliding-window recompute over
   the same span (the sinks + window + the query), the only thing a fixed-memory model can be held to.
3. The long stream (``--long-ticks``, 100k by default): the sink cache streams it in small chunks, and its NLL
   at evenly spread ticks is compared with sliding-window recompute at the same ticks.

Both bounded caches hold a quarter of the eval context, so the 25% selective budget and the sink are compared at
equal memory.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..checkpoint import SHIPPED_CHECKPOINT

POLICIES = ("full", "int8", "int4", "sink", "selective")
REPORTED_TICKS = (4_096, 16_384)
BYTES_CHUNK = 512
# The bounded caches stream in small chunks: a chunk attends to all of itself, which widens their span.
BOUNDED_CHUNK = 32


def add_arguments(parser) -> None:
    parser.add_argument("--json", default="out/bench/cache.json", help="where to write the results (default: %(default)s)")
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="model folder (default: %(default)s)")
    parser.add_argument("--eval-ticks", type=int, default=2_048, help="ticks fed one at a time for NLL and latency")
    parser.add_argument("--grow-ticks", type=int, default=16_384, help="ticks streamed through the growing caches")
    parser.add_argument("--long-ticks", type=int, default=100_000, help="ticks streamed through the bounded caches")
    parser.add_argument("--num-sink-tokens", type=int, default=4)
    parser.add_argument("--reference-samples", type=int, default=256, help="ticks scored by sliding-window recompute")
    parser.add_argument("--quick", action="store_true", help="small settings that finish in about a minute")


def _attention_for(policy: str) -> str:
    """Eager attention where the selective cache needs its weights, SDPA for every other policy."""
    return "eager" if policy == "selective" else "sdpa"


def _held_out_stream(tokenizer) -> tuple[np.ndarray, str]:
    from ..data import bundled_series_names, load_series, split_periods, tokenize_period

    names = bundled_series_names()
    ids = np.concatenate([tokenize_period(split_periods(load_series(name))[2], tokenizer) for name in names])
    return ids, f"test periods of {len(names)} bundled series, concatenated ({len(ids)} tokens)"


def _ticks(stream: np.ndarray, length: int):
    import torch

    return torch.as_tensor(np.resize(stream, length)).unsqueeze(0)


def _token_nll(logits, targets) -> np.ndarray:
    import torch

    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none").numpy()


def _stream_in_chunks(model, cache, ticks, chunk: int, marks=()) -> tuple[np.ndarray, dict[int, int]]:
    """Feeds ``ticks`` through ``cache`` ``chunk`` at a time; next-tick NLLs and ``nbytes()`` at each mark.

    A chunk ends early at a mark, so every mark is measured whatever the chunk size (25,000 is no multiple of 32).
    """
    import torch

    length = ticks.shape[1]
    stops = sorted({*range(chunk, length, chunk), length, *(mark for mark in marks if 0 < mark <= length)})
    nll, nbytes = [], {}
    with torch.no_grad():
        start = 0
        for stop in stops:
            logits = model(ticks[:, start:stop], past_key_values=cache).logits[0]
            targets = ticks[0, start + 1 : stop + 1]
            nll.append(_token_nll(logits[: len(targets)], targets))
            if stop in marks:
                nbytes[stop] = cache.nbytes()
            start = stop
    return np.concatenate(nll), nbytes


def _stream_ticks(model, cache, ticks) -> tuple[np.ndarray, list[float]]:
    """Feeds ``ticks`` one at a time; next-tick NLLs and the wall-clock seconds of each step."""
    import torch

    nll, seconds = [], []
    with torch.no_grad():
        for position in range(ticks.shape[1] - 1):
            start = time.perf_counter()
            logits = model(ticks[:, position : position + 1], past_key_values=cache).logits[0, -1]
            seconds.append(time.perf_counter() - start)
            nll.append(_token_nll(logits[None], ticks[0, position + 1 : position + 2])[0])
    return np.asarray(nll), seconds


def _sliding_window_nll(model, ticks, positions, span: int, batch_size: int = 16) -> np.ndarray:
    """NLL of tick ``p + 1`` from a fresh forward pass over the ``span`` ticks ending at ``p``, for each ``p``."""
    import torch

    nll = []
    with torch.no_grad():
        for first in range(0, len(positions), batch_size):
            batch = positions[first : first + batch_size]
            windows = torch.stack([ticks[0, position + 1 - span : position + 1] for position in batch])
            logits = model(windows, logits_to_keep=1).logits[:, -1]
            nll.append(_token_nll(logits, ticks[0, [position + 1 for position in batch]]))
    return np.concatenate(nll)


def _delta_pct(value: float, reference: float) -> float:
    return 100.0 * (value - reference) / reference


def run(args) -> int:
    from ..cache import build_cache, track_attention
    from ..checkpoint import load_checkpoint
    from ._common import machine_info, percentile_ms, write_json

    if args.quick:
        args.eval_ticks, args.grow_ticks, args.long_ticks, args.reference_samples = 256, 2_048, 4_096, 32
    if args.eval_ticks < 64 or args.grow_ticks < 64 or args.long_ticks < args.eval_ticks:
        raise ValueError("--eval-ticks and --grow-ticks must be at least 64, --long-ticks at least --eval-ticks")
    model, tokenizer = load_checkpoint(args.checkpoint)
    model_label = f"checkpoint {args.checkpoint}"
    track_attention(model)
    stream, data_label = _held_out_stream(tokenizer)
    if args.long_ticks > len(stream):
        data_label += f", cycled to {args.long_ticks} ticks"
    print(f"model: {model_label}\ndata:  {data_label}")

    budget = args.eval_ticks // 4
    cache_kwargs = {
        "full": {},
        "int8": {},
        "int4": {},
        "sink": {"num_sink_tokens": args.num_sink_tokens, "window": budget - args.num_sink_tokens},
        "selective": {"budget": budget, "policy": "hybrid", "num_sink_tokens": args.num_sink_tokens},
    }
    span = budget + 1  # what a bounded cache's query sees: everything it holds, and itself
    results = {policy: {"cache_kwargs": cache_kwargs[policy]} for policy in POLICIES}

    # 1. Bytes after 4k, 16k and the long stream: measured where a cache streamed that far, else extrapolated
    # linearly from its two measurements (exact for the bounded caches, which stop growing).
    long_ticks = _ticks(stream, args.long_ticks)
    reported = sorted({*REPORTED_TICKS, args.long_ticks})
    long_sink_nll = None
    for policy in POLICIES:
        bounded = policy in ("sink", "selective")
        model.set_attn_implementation(_attention_for(policy))
        cache = build_cache(model.config, policy, **cache_kwargs[policy])
        length = args.long_ticks if bounded else args.grow_ticks
        marks = sorted({length // 4, length, *(ticks for ticks in reported if ticks <= length)})
        started = time.perf_counter()
        nll, nbytes = _stream_in_chunks(
            model, cache, long_ticks[:, :length], BOUNDED_CHUNK if bounded else BYTES_CHUNK, marks
        )
        if policy == "sink":
            long_sink_nll = nll
        growth = (nbytes[length] - nbytes[length // 4]) / (length - length // 4)
        for ticks in reported:
            measured = ticks in nbytes
            results[policy][f"bytes_{ticks}"] = nbytes[ticks] if measured else int(nbytes[length] + growth * (ticks - length))
            results[policy][f"bytes_{ticks}_source"] = "measured" if measured else (
                f"extrapolated linearly from the measurements after {length // 4} and {length} ticks"
            )
        results[policy].update(
            {
                "tokens_held": cache.num_tokens_held(),
                "bytes_per_token_held": cache.nbytes() / cache.num_tokens_held(),
                "bytes_stream_seconds": round(time.perf_counter() - started, 2),
            }
        )
        print(f"bytes: {policy} streamed {length} ticks in {time.perf_counter() - started:.1f}s")
    for policy in POLICIES:
        results[policy]["bytes_ratio"] = results[policy]["bytes_16384"] / results["full"]["bytes_16384"]

    # 2. Next-step NLL and step latency, one tick at a time.
    eval_ticks = _ticks(stream, args.eval_ticks)
    for policy in POLICIES:
        model.set_attn_implementation(_attention_for(policy))
        cache = build_cache(model.config, policy, **cache_kwargs[policy])
        results[policy]["attention"] = _attention_for(policy)
        nll, seconds = _stream_ticks(model, cache, eval_ticks)
        results[policy].update({"nll": float(nll.mean()), "p50_ms": percentile_ms(seconds), "p90_ms": percentile_ms(seconds, 90)})
        results[policy]["_token_nll"] = nll
        print(f"nll:   {policy} {args.eval_ticks} steps, p50 {results[policy]['p50_ms']:.1f} ms")

    model.set_attn_implementation("sdpa")
    full_nll = results["full"]["_token_nll"]
    # Up to the first eviction the sink cache holds everything, as sliding-window recompute sees everything.
    evicting = np.arange(span - 1, args.eval_ticks - 1)
    sampled = evicting[:: max(1, math.ceil(len(evicting) / args.reference_samples))]
    window_nll = full_nll.copy()
    window_nll[sampled] = _sliding_window_nll(model, eval_ticks, list(sampled), span)
    scored = np.concatenate([np.arange(span - 1), sampled])
    for policy in POLICIES:
        token_nll = results[policy].pop("_token_nll")
        if policy == "sink":
            value, reference = token_nll[scored].mean(), window_nll[scored].mean()
            results[policy]["nll_reference"] = f"sliding-window recompute over {span} ticks ({len(sampled)} sampled steps)"
        else:
            value, reference = token_nll.mean(), full_nll.mean()
            results[policy]["nll_reference"] = "full cache"
        results[policy]["nll_delta_pct"] = _delta_pct(float(value), float(reference))

    # 3. The sink cache over the long stream against sliding-window recompute at evenly spread ticks.
    positions = np.linspace(span, args.long_ticks - 2, args.reference_samples).astype(int)
    recompute = _sliding_window_nll(model, long_ticks, list(positions), span)
    tenth = args.long_ticks // 10
    long_stream = {
        "ticks": args.long_ticks,
        "chunk": BOUNDED_CHUNK,
        "sampled_ticks": len(positions),
        "sink_nll": float(long_sink_nll[positions].mean()),
        "sliding_window_nll": float(recompute.mean()),
        "nll_delta_pct": _delta_pct(float(long_sink_nll[positions].mean()), float(recompute.mean())),
        "sink_nll_first_tenth": float(long_sink_nll[:tenth].mean()),
        "sink_nll_last_tenth": float(long_sink_nll[-tenth:].mean()),
        "training_context": model.config.max_position_embeddings,
    }
    results["sink"]["long_stream"] = long_stream

    header = f"{'policy':<10} {'B/token':>8} {'4k MB':>8} {'16k MB':>8} {f'{args.long_ticks} MB':>8} {'ratio':>6} {'NLL Δ%':>7} {'p50 ms':>7}"
    print(header)
    for policy in POLICIES:
        row = results[policy]
        print(
            f"{policy:<10} {row['bytes_per_token_held']:>8.1f} {row['bytes_4096'] / 1e6:>8.2f} {row['bytes_16384'] / 1e6:>8.2f} "
            f"{row[f'bytes_{args.long_ticks}'] / 1e6:>8.2f} {row['bytes_ratio']:>6.3f} {row['nll_delta_pct']:>+7.2f} "
            f"{row['p50_ms']:>7.1f}"
        )
    print(
        f"sink over {args.long_ticks} ticks: NLL {long_stream['sink_nll']:.4f} vs sliding-window recompute "
        f"{long_stream['sliding_window_nll']:.4f} ({long_stream['nll_delta_pct']:+.2f}%); first tenth "
        f"{long_stream['sink_nll_first_tenth']:.4f}, last tenth {long_stream['sink_nll_last_tenth']:.4f}"
    )
    for policy in POLICIES:
        extrapolated = [str(ticks) for ticks in reported if results[policy][f"bytes_{ticks}_source"] != "measured"]
        if extrapolated:
            print(f"{policy}: bytes after {', '.join(extrapolated)} ticks extrapolated, the rest measured")

    payload = {
        "benchmark": "cache",
        "model": model_label,
        "data": data_label,
        "eval_ticks": args.eval_ticks,
        "machine": machine_info(),
        "policies": results,
    }
    print(f"wrote {write_json(args.json, payload)}")
    return 0
