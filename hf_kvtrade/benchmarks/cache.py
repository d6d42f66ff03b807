"""KV cache policies side by side: bytes held, and forecast quality in nats per bar of full, int8, int4, sink, selective.

Quality is the NLL of the realised return, one tick at a time, on the test periods of real bundled series; a change
against the full cache is reported in nats per bar and as a share of the model's edge over the unconditional
Student-t. Settings: **W** (every policy rebased by the context policy) and **8W** (the sink streams ``8W`` ticks
without a rebase before the first scored bar). Method and results: docs/cache_policies.md.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from ._common import add_common_arguments, markdown_table, verdict

POLICIES = ("full", "int8", "int4", "sink", "selective")
# Largest share of the edge each policy may lose (issue 13).
EDGE_LOSS_TARGETS = {"int8": 0.01, "int4": 0.05, "sink": 0.10, "selective": 0.10}
# The hourly series (the longest; btc_usd_1h alone has 8W of history before its test period) and the two indices:
# about 3,600 scored bars, so that the default run stays within a few minutes on two busy cores.
DEFAULT_SERIES = "btc_usd_1h,eurusd_h1,sp500,nasdaq"


def add_arguments(parser) -> None:
    add_common_arguments(parser, "cache", checkpoint=True, threads=True)
    parser.add_argument(
        "--series", default=DEFAULT_SERIES, help="comma-separated bundled series to score (default: %(default)s)"
    )
    parser.add_argument(
        "--long-windows", type=int, default=8, help="ticks the sink streams before scoring, in W (default: %(default)s)"
    )
    parser.add_argument("--num-sink-tokens", type=int, default=4)


def _attention_for(policy: str) -> str:
    """Eager attention where the selective cache needs its weights, SDPA for every other policy."""
    return "eager" if policy == "selective" else "sdpa"


def _stream(model, tokenizer, new_cache, ids: np.ndarray, first_target: int, anchor_of, prefill_chunk: int | None):
    """Next-bar distributions of ``ids[first_target:]``, one tick at a time: ``(distribution, stats)``.

    When ``anchor_of(k)``, the first token the forecast of ``k`` conditions on, moves, a fresh ``new_cache()`` reads
    ``ids[anchor:k]`` in chunks of ``prefill_chunk`` tokens (all at once when None). ``stats`` holds the seconds of
    each one-tick step and the most bytes and tokens the cache held.
    """
    import torch

    from ..distribution import BinnedDistribution

    token_ids = torch.as_tensor(ids).unsqueeze(0)
    probs, stats = [], {"seconds": [], "bytes_held": 0, "tokens_held": 0}
    anchor, cache = None, None
    with torch.inference_mode():
        for target in range(first_target, len(ids)):
            if anchor_of(target) != anchor:
                anchor, cache = anchor_of(target), new_cache()
                step = prefill_chunk or target - anchor
                for start in range(anchor, target, step):
                    logits = model(token_ids[:, start : min(start + step, target)], past_key_values=cache).logits
            else:
                started = time.perf_counter()
                logits = model(token_ids[:, target - 1 : target], past_key_values=cache).logits
                stats["seconds"].append(time.perf_counter() - started)
            probs.append(torch.softmax(logits[0, -1].double(), dim=-1).numpy())
            stats["bytes_held"] = max(stats["bytes_held"], cache.nbytes())
            stats["tokens_held"] = max(stats["tokens_held"], cache.num_tokens_held())
    return BinnedDistribution.from_token_probs(np.stack(probs), tokenizer), stats


def _held_and_latency(streams: list[dict]) -> dict:
    """The most tokens and bytes held over several streams' ``stats``, and the p50 and p90 of their steps."""
    from ._common import percentile_ms

    seconds = [step for stats in streams for step in stats["seconds"]]
    return {
        "tokens_held": max(stats["tokens_held"] for stats in streams),
        "bytes_held": max(stats["bytes_held"] for stats in streams),
        "p50_ms": percentile_ms(seconds),
        "p90_ms": percentile_ms(seconds, 90),
    }


def _quality(policy_nll: np.ndarray, full_nll: np.ndarray, baseline_nll: np.ndarray) -> dict:
    """NLL change against the full cache in nats per bar, and as a share of the full cache's edge over the baseline."""

    def mean_and_error(values: np.ndarray) -> tuple[float, float]:
        return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0

    change, change_error = mean_and_error(policy_nll - full_nll)
    edge, edge_error = mean_and_error(baseline_nll - full_nll)
    return {
        "nll": float(policy_nll.mean()),
        "nll_change": change,
        "nll_change_stderr": change_error,
        "edge": edge,
        "edge_stderr": edge_error,
        "share_of_edge": change / edge if edge > 0 else None,
    }


def _target(policy: str, row: dict) -> dict:
    limit, share = EDGE_LOSS_TARGETS[policy], row["share_of_edge"]
    if share is None:
        return {"limit": limit, "met": False, "why": "the full cache has no edge over the unconditional baseline here"}
    return {"limit": limit, "met": share <= limit}


def run(args) -> int:
    import torch

    from ..cache import build_cache, track_attention
    from ..checkpoint import load_checkpoint
    from ..context import ContextPolicy
    from ..data import load_series
    from ..data.windows import tokenize_period
    from ..evaluation import model_forecast, returns_and_test_start, unconditional_forecast
    from ._common import machine_info, write_json

    if args.long_windows < 1:
        raise ValueError(f"--long-windows must be at least 1, got {args.long_windows}")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint)
    track_attention(model)
    context = ContextPolicy.from_config(model.config)
    budget = context.window // 4  # of the bounded caches (sink, selective): 25% of a full cache at a window's end
    long_ticks = args.long_windows * context.window
    cache_kwargs = {policy: {} for policy in ("full", "int8", "int4")} | {
        "sink": {"num_sink_tokens": args.num_sink_tokens, "window": budget - args.num_sink_tokens},
        "selective": {"budget": budget, "policy": "hybrid", "num_sink_tokens": args.num_sink_tokens},
    }

    def cache_factory(policy: str):
        return partial(build_cache, model.config, policy, **cache_kwargs[policy])

    names = [name.strip() for name in args.series.split(",") if name.strip()]
    series = {}
    for name in names:
        frame = load_series(name)
        returns, test_start = returns_and_test_start(frame)
        # ids[k + 1] is the token of returns[k]: the scored tokens are those of the test-period returns.
        series[name] = (tokenize_period(frame, tokenizer), test_start + 1, returns[test_start:], returns, test_start)
    long_names = [name for name, (_, first_target, *_) in series.items() if first_target >= long_ticks]
    if not long_names:
        raise ValueError(
            f"none of the series {names} has {long_ticks} ticks ({args.long_windows}W) before its test period for the "
            "sink's long stream: add a longer one (btc_usd_1h has) or lower --long-windows"
        )
    print(f"model: checkpoint {args.checkpoint}, context window W={context.window}, stride {context.stride}")
    print(f"data:  test periods of {', '.join(names)} ({sum(len(s[2]) for s in series.values())} bars)")

    # The reference and the baseline, per bar: the context-policy forecast (what `kvtrade evaluate` scores) and the
    # unconditional Student-t fitted before the test period.
    reference_nll, baseline_nll, nll = {}, {}, {policy: {} for policy in POLICIES}
    streams = {policy: [] for policy in POLICIES}
    for name, (ids, first_target, target_returns, returns, test_start) in series.items():
        model.set_attn_implementation("sdpa")
        reference_nll[name] = -model_forecast(model, tokenizer, ids, first_target, context).log_density(target_returns)
        baseline_nll[name] = -unconditional_forecast(returns, test_start).log_density(target_returns)
        for policy in POLICIES:
            model.set_attn_implementation(_attention_for(policy))
            started = time.perf_counter()
            distribution, stats = _stream(
                model, tokenizer, cache_factory(policy), ids, first_target, context.start, prefill_chunk=None
            )
            nll[policy][name] = -distribution.log_density(target_returns)
            streams[policy].append(stats)
            print(f"W:  {name} {policy}: {len(target_returns)} bars in {time.perf_counter() - started:.1f}s", flush=True)

    def pooled(per_series: dict, which=names) -> np.ndarray:
        return np.concatenate([per_series[name] for name in which])

    full_nll = pooled(nll["full"])
    window_rows = {}
    for policy in POLICIES:
        row = {
            "cache_kwargs": cache_kwargs[policy],
            "attention": _attention_for(policy),
            **_held_and_latency(streams[policy]),
            **_quality(pooled(nll[policy]), full_nll, pooled(baseline_nll)),
            "series": {name: _quality(nll[policy][name], nll["full"][name], baseline_nll[name]) for name in names},
        }
        if policy == "full":
            row["max_abs_nll_gap_to_context_policy_forecast"] = float(np.max(np.abs(full_nll - pooled(reference_nll))))
        else:
            row["target"] = _target(policy, row)
        window_rows[policy] = row

    # 8W: the sink streams long_ticks ticks one at a time before the first scored bar, and never rebases.
    sink_nll, sink_streams = {}, []
    model.set_attn_implementation(_attention_for("sink"))
    for name in long_names:
        ids, first_target, target_returns, *_ = series[name]
        started = time.perf_counter()
        distribution, stats = _stream(
            model, tokenizer, cache_factory("sink"), ids, first_target,
            anchor_of=lambda _, start=first_target - long_ticks: start, prefill_chunk=1,
        )
        sink_nll[name] = -distribution.log_density(target_returns)
        sink_streams.append(stats)
        print(f"8W: {name} sink: {long_ticks} + {len(target_returns)} ticks in {time.perf_counter() - started:.1f}s", flush=True)
    long_reference, long_baseline = pooled(reference_nll, long_names), pooled(baseline_nll, long_names)
    long_row = {
        "cache_kwargs": cache_kwargs["sink"],
        "series": long_names,
        "stream_ticks_before_first_scored_bar": long_ticks,
        "reference": "the context-policy forecast (the full cache rebased by the policy; positions never exceed W)",
        **_held_and_latency(sink_streams),
        **_quality(pooled(sink_nll, long_names), long_reference, long_baseline),
        # The same bars at W: what the long stream itself costs, apart from the series.
        "rebased_on_the_same_bars": _quality(pooled(nll["sink"], long_names), long_reference, long_baseline),
    }
    long_row["target"] = _target("sink", long_row)

    machine = machine_info()
    payload = {
        "benchmark": "cache",
        "model": f"checkpoint {args.checkpoint}",
        "context_policy": vars(context),
        "series": names,
        "num_bars": len(full_nll),
        "bounded_budget_tokens": budget,
        "units": "NLL in nats per bar of the realised log-return; share_of_edge = nll_change / edge",
        "machine": machine,
        "window": window_rows,
        "long_stream": long_row,
    }
    full = window_rows["full"]
    print(
        f"\nW={context.window}: every policy rebased by the context policy; {len(full_nll)} bars; edge of the full cache "
        f"over the unconditional Student-t: {full['edge']:.5f} ± {full['edge_stderr']:.5f} nats/bar"
    )
    print(
        f"full cache vs the context-policy forecast of `kvtrade evaluate`: largest gap "
        f"{full['max_abs_nll_gap_to_context_policy_forecast']:.2e} nats on a bar"
    )
    print(
        f"\n{args.long_windows}W={long_ticks}: the sink streams {long_ticks} ticks before the first scored bar without a "
        f"rebase ({', '.join(long_names)}; {len(long_reference)} bars); reference: the context-policy "
        f"forecast (positions never exceed W); edge {long_row['edge']:.5f} ± {long_row['edge_stderr']:.5f} nats/bar. "
        "full, int8, int4 and selective rebase by the context policy, so on any stream they forecast as in the W rows."
    )
    rebased = long_row["rebased_on_the_same_bars"]
    print(
        f"the sink rebased by the policy on the same bars: {rebased['nll_change']:+.5f} ± "
        f"{rebased['nll_change_stderr']:.5f} nats/bar"
        + ("" if rebased["share_of_edge"] is None else f" ({100 * rebased['share_of_edge']:+.2f}% of the edge)")
    )
    print(markdown(payload))  # its target column holds each policy's verdict (share of the edge lost)
    print(f"wrote {write_json(args.json, payload)}")
    return 0


def markdown(payload: dict) -> str:
    full_bytes = payload["window"]["full"]["bytes_held"]

    def cells(setting: str, policy: str, row: dict) -> dict:
        share, target = row["share_of_edge"], row.get("target")
        met = None if target is None else f"≤{100 * target['limit']:.0f}%: {verdict(target['met'])}"
        met = f"{met} ({target['why']})" if target and "why" in target else met
        share = None if share is None else 100 * share
        vs_full = row["bytes_held"] / full_bytes
        return {**row, "setting": setting, "policy": policy, "vs_full": vs_full, "share": share, "met": met}

    long_stream = payload["long_stream"]
    rows = [cells(f"W={payload['context_policy']['window']}", name, row) for name, row in payload["window"].items()]
    rows.append(cells(f"{long_stream['stream_ticks_before_first_scored_bar']}-tick stream", "sink", long_stream))
    columns = {
        "setting": "setting", "policy": "policy", "tokens held": "tokens_held", "bytes held": "bytes_held",
        "bytes vs full": "vs_full", "NLL change nats/bar": "nll_change", "± s.e.": "nll_change_stderr",
        "% of edge over uncond. t": "share", "target": "met", "step p50 ms": "p50_ms",
    }
    return markdown_table("Cache policies: bytes and nats per bar lost", columns, rows, payload["machine"])
