"""Per-tick latency of the streaming engine against its floor and a full recompute, at growing context lengths.

Beside the timed ticks, in the same process and thread count: the floor (reading every weight and the session's
filled K/V once, what a tick cannot beat) and the recompute (one cache-free forward over the context, what a
stateless forecaster pays). Targets: tick p50 at most 1.5x the floor at every context, and p50 at the largest
context at most 1.3x p50 at the smallest (flatness). Method and results: docs/streaming.md.
"""

from __future__ import annotations

from functools import partial

from ._common import add_common_arguments, markdown_table

FLOOR_MULTIPLE = 1.5
FLATNESS = 1.3


def add_arguments(parser) -> None:
    quick = "30 ticks and one recompute per context"
    add_common_arguments(parser, "stream", quick=quick, checkpoint=True, threads=True)
    parser.add_argument("--contexts", type=int, nargs="+", help="context lengths (default: 64, 256 and the trained window)")
    parser.add_argument("--ticks", type=int, default=200, help="timed ticks per context, at most half of it (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed full recomputes per context")
    parser.add_argument("--policy", default="full", help="cache policy of the engine (default: %(default)s)")


def run(args) -> int:
    import time

    import numpy as np
    import torch

    from ..checkpoint import load_checkpoint
    from ..context import ContextPolicy
    from ..streaming import StreamingForecaster
    from ._common import machine_info, machine_label, print_target, time_calls, write_json

    ticks = 30 if args.quick else args.ticks
    repeats = 1 if args.quick else args.repeats
    if ticks < 1 or repeats < 1:
        raise SystemExit("--ticks and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint)
    contexts = sorted(args.contexts or {64, 256, ContextPolicy.from_config(model.config).window})
    max_context = model.config.max_position_embeddings
    out_of_range = [context for context in contexts if not 4 <= context <= max_context]
    if out_of_range:
        raise SystemExit(f"contexts {out_of_range} must lie in [4, {max_context}] (max_position_embeddings)")
    machine = machine_info("cpu")
    print(f"model: checkpoint {args.checkpoint}; policy {args.policy}; machine {machine_label(machine)}")
    prices = 100.0 * np.exp(np.cumsum(np.random.default_rng(0).normal(0.0, 0.01, max(contexts))))
    ids = torch.as_tensor(tokenizer.encode(prices)).unsqueeze(0)

    # Timing only: the policy is widened to every position the model has so that no rebase interrupts the timed
    # ticks, also for contexts past the trained window. The forecasts themselves are not used.
    timing_policy = ContextPolicy(window=max_context, stride=max_context // 2)
    results = {}
    for context in contexts:
        engine = StreamingForecaster(model, tokenizer, cache_policy=args.policy, context_policy=timing_policy)
        timed = min(ticks, context // 2)
        engine.prime("bench", prices[: context - timed])
        cpu_ms = []
        for price in prices[context - timed : context]:
            started = time.thread_time()
            engine.update("bench", price)
            cpu_ms.append((time.thread_time() - started) * 1e3)
        stats = engine.latency_stats()
        floor_ms = _read_once_ms(model, engine.session_cache("bench"))
        with torch.inference_mode():
            recompute = time_calls(partial(model, input_ids=ids[:, :context], logits_to_keep=1), repeats, warmup=0)
        recompute_ms = 1e3 * float(np.median(recompute))
        results[str(context)] = {
            "ticks": timed,
            "incremental_p50_ms": round(stats["p50_ms"], 3),
            "incremental_p99_ms": round(stats["p99_ms"], 3),
            # CPU time of the ticking thread: what a tick costs when it does not wait for a shared core.
            "incremental_cpu_p50_ms": round(float(np.median(cpu_ms)), 3),
            "read_weights_and_cache_ms": round(floor_ms, 3),
            "p50_over_floor": round(stats["p50_ms"] / floor_ms, 2),
            "recompute_ms": round(recompute_ms, 2),
            "recompute_over_p50": round(recompute_ms / stats["p50_ms"], 1),
            "cache_bytes": engine.cache_bytes(),
        }
        del engine
        print(f"context {context:5d}: {results[str(context)]}", flush=True)

    smallest, largest = results[str(contexts[0])], results[str(contexts[-1])]
    flatness = largest["incremental_p50_ms"] / smallest["incremental_p50_ms"]
    cpu_flatness = largest["incremental_cpu_p50_ms"] / smallest["incremental_cpu_p50_ms"]
    cpu_over_floor = max(row["incremental_cpu_p50_ms"] / row["read_weights_and_cache_ms"] for row in results.values())
    worst = max(row["p50_over_floor"] for row in results.values())
    floor_verdict = print_target(
        f"tick p50 <= {FLOOR_MULTIPLE}x the floor at every context", f"worst {worst}x", worst <= FLOOR_MULTIPLE, machine
    )
    flatness_verdict = print_target(
        f"p50({contexts[-1]}) / p50({contexts[0]}) <= {FLATNESS}", f"{flatness:.2f}", flatness <= FLATNESS, machine
    )
    print(f"in thread CPU time: worst p50 / floor {cpu_over_floor:.2f}x, flatness {cpu_flatness:.2f}")
    targets = {
        "p50_over_floor": {"target": FLOOR_MULTIPLE, "worst": worst, "verdict": floor_verdict},
        "flatness": {"target": FLATNESS, "measured": round(flatness, 2), "verdict": flatness_verdict},
        # The same two ratios from thread CPU time, which a busy shared machine does not inflate.
        "cpu_time": {"worst_p50_over_floor": round(cpu_over_floor, 2), "flatness": round(cpu_flatness, 2)},
    }
    report = {
        "benchmark": "stream",
        "model": f"checkpoint {args.checkpoint}",
        "policy": args.policy,
        "threads": args.threads,
        "recompute_repeats": repeats,
        "machine": machine,
        "contexts": results,
        "flatness": round(flatness, 2),
        "targets": targets,
    }
    print(markdown(report))
    print(f"wrote {write_json(args.json, report)}")
    return 0


def markdown(report: dict) -> str:
    columns = {
        "context": "context", "incremental p50 ms": "incremental_p50_ms", "floor ms": "read_weights_and_cache_ms",
        "p50 / floor": "p50_over_floor", "recompute ms": "recompute_ms", "recompute / p50": "recompute_over_p50",
    }
    rows = [{"context": context, **row} for context, row in report["contexts"].items()]
    return markdown_table("KV cache vs full recompute, per tick", columns, rows, report["machine"])


def _read_once_ms(model, cache) -> float:
    """Median time to read every weight and every filled K/V entry once (a bandwidth-bound sum per tensor)."""
    import torch

    from ._common import percentile_ms, time_calls

    tensors = list(model.parameters())
    tensors += [tensor[:, :, : layer.get_seq_length()] for layer in cache.layers for tensor in (layer.keys, layer.values)]
    with torch.inference_mode():
        return percentile_ms(time_calls(lambda: [tensor.sum() for tensor in tensors], repeats=20, warmup=0))
