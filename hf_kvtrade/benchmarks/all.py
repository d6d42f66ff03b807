"""Every benchmark side by side in one run: report.json, report.md (tables) and report.png under --out.

Runs, in one process on one machine: KV cache vs full recompute by context (stream), batched ticks for many
symbols vs one at a time (batch), MHA vs GQA vs MQA (gqa), cache policies in nats per bar (cache), the order-book
replay (orderbook), attention backends at long context (attention), Transformers vs vLLM serving and fairness
(serve) and the attention map of the shipped model (attention_map). Each benchmark is called through its own command-line
arguments, so `kvtrade bench all` measures exactly what `kvtrade bench NAME` measures.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import traceback
from pathlib import Path

# Order: the cheap, central comparisons first, so a failure late in the run still leaves them in the report.
SECTIONS = ("stream", "batch", "gqa", "cache", "orderbook", "attention", "serve", "attention_map")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/bench", help="folder for report.json, report.md and plots")
    parser.add_argument("--quick", action="store_true", help="every benchmark in its --quick mode (under 5 minutes)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these benchmarks")


def run(args) -> int:
    from ._common import machine_info, write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, failures = {}, {}
    started = datetime.datetime.now(datetime.timezone.utc)
    for name in args.only or SECTIONS:
        print(f"\n=== bench {name} ===", flush=True)
        try:
            results[name] = _run_benchmark(name, out, args.quick)
        except Exception:  # noqa: BLE001 - one broken benchmark must not lose the others' numbers
            failures[name] = traceback.format_exc()
            print(failures[name], flush=True)
    report = {
        "started": started.isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "machine": machine_info("cpu"),
        "results": results,
        "failures": {name: trace.strip().splitlines()[-1] for name, trace in failures.items()},
    }
    write_json(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report))
    _plot(results, out / "report.png")
    print((out / "report.md").read_text())
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'report.png'}")
    return 1 if failures else 0


def _run_benchmark(name: str, out: Path, quick: bool) -> dict:
    module = importlib.import_module(f"{__package__}.{name}")
    parser = argparse.ArgumentParser(prog=f"kvtrade bench {name}")
    module.add_arguments(parser)
    argv = ["--out", str(out / name)] if name == "attention_map" else ["--json", str(out / f"{name}.json")]
    # attention_map is a single forward pass and has no --quick; get_default is None for an unknown option.
    if quick and parser.get_default("quick") is not None:
        argv.append("--quick")
    status = module.run(parser.parse_args(argv))
    if status:
        raise RuntimeError(f"bench {name} exited with status {status}")
    path = out / name / "attention_map.json" if name == "attention_map" else out / f"{name}.json"
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------- markdown
def _machine_label(info: dict) -> str:
    return f"{info.get('cpu', '?')} ({info.get('cores', '?')} cores, {info.get('device', 'cpu')})"


def _table(headers: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    machine = _machine_label(report["machine"])
    results = report["results"]
    parts = [
        f"# hf-kvtrade benchmark report\n\nRun {report['started']} on {machine}"
        f"{' (quick mode)' if report['quick'] else ''}. Every row below was measured in this one run.\n"
    ]
    if "stream" in results:
        contexts = results["stream"]["contexts"]
        parts.append("## KV cache vs full recompute, per tick\n\n" + _table(
            ["context", "incremental p50 ms", "floor ms", "p50 / floor", "recompute ms", "recompute / p50", "machine"],
            [[ctx, row["incremental_p50_ms"], row["read_weights_and_cache_ms"], row["p50_over_floor"], row["recompute_ms"],
              row["recompute_over_p50"], machine] for ctx, row in contexts.items()],
        ))
    if "batch" in results:
        parts.append("## Batched ticks (update_many) vs one update per symbol\n\n" + _table(
            ["symbols", "batched ticks/s", "sequential ticks/s", "speedup", "CPU-time speedup", "step p50 ms",
             "step p99 ms", "machine"],
            [[row["symbols"], row["batched_ticks_per_s"], row["sequential_ticks_per_s"], row["speedup"],
              row["cpu_speedup"], row["batch_step_p50_ms"], row["batch_step_p99_ms"], _machine_label(results["batch"]["machine"])]
             for row in results["batch"]["results"].values()],
        ))
    if "gqa" in results:
        parts.append("## MHA vs GQA vs MQA at equal width\n\n" + _table(
            ["attention", "kv heads", "context", "cache bytes/token", "decode p50 ms", "cache vs MHA", "speed vs MHA", "machine"],
            [
                [row["attention"], row["num_key_value_heads"], row["context"], row["cache_bytes_per_token"],
                 row["decode_p50_ms"], row.get("cache_reduction_vs_mha"), row.get("decode_speedup_vs_mha"),
                 _machine_label(row["machine"])]
                for row in results["gqa"]["rows"]
            ],
        ))
    if "cache" in results:
        cache = results["cache"]

        def policy_row(setting: str, name: str, row: dict) -> list:
            share, target = row["share_of_edge"], row.get("target")
            verdict = "" if target is None else f"≤{100 * target['limit']:.0f}%: {'met' if target['met'] else 'MISSED'}"
            return [setting, name, row["bytes_held"], row["nll_change"], None if share is None else 100 * share,
                    verdict, _machine_label(cache["machine"])]  # fmt: skip

        long_stream = cache["long_stream"]
        parts.append("## Cache policies: bytes and nats per bar lost\n\n" + _table(
            ["setting", "policy", "bytes held", "NLL change nats/bar", "% of edge over uncond. t", "target", "machine"],
            [policy_row(f"W={cache['context_policy']['window']}", name, row) for name, row in cache["window"].items()]
            + [policy_row(f"{long_stream['stream_ticks_before_first_scored_bar']}-tick stream", "sink", long_stream)],
        ))
    if "orderbook" in results:
        book = results["orderbook"]
        parts.append(
            f"## Order-book replay ({book['order_events']:,} events, capture peak {book['peak_live_events_per_s']:,.0f}/s)\n\n"
            + _table(
                ["path", "events/s", "ticks/s", "tick p50 ms", "tick p99 ms", "cache bytes", "machine"],
                [[name, row["events_per_s"], row.get("ticks_per_s"), row.get("p50_tick_ms"), row.get("p99_tick_ms"),
                  row.get("cache_bytes"), _machine_label(book["machine"])] for name, row in book["rows"].items()],
            )
            + f"\n\nHeadroom over the peak: {book['headroom']:.1f}x (target {book['target_headroom']:.0f}x: "
            f"{'met' if book['target_met'] else 'MISSED'})."
        )
    if "attention" in results:
        parts.append("## Attention backends at long context (prefill)\n\n" + _table(
            ["backend", "context", "mode", "prefill s", "peak extra MiB", "memory vs eager", "skipped", "machine"],
            [
                [row["backend"], row["context"], row["mode"], row.get("prefill_s"), row.get("peak_extra_mib"),
                 row.get("memory_vs_eager", row.get("chunked_memory_reduction")), row.get("skipped"),
                 _machine_label(row["machine"])]
                for row in results["attention"]["rows"]
            ],
        ))
    if "serve" in results:
        throughput, prefix = results["serve"]["throughput"], results["serve"]["prefix"]
        parts.append("## Transformers vs vLLM serving\n\n" + _table(
            ["measure", "Transformers / cold", "vLLM / warm", "ratio", "machine"],
            [
                ["forecasts per second", throughput["hf_forecasts_per_s"], throughput["vllm_forecasts_per_s"],
                 throughput["ratio"], machine],
                ["new-bar latency ms (prefix cold vs warm)", prefix["cold_ms"], prefix["warm_ms"], prefix["ratio"], machine],
            ],
        ))
        if "fairness" in results["serve"]:
            fairness = results["serve"]["fairness"]
            light, target = fairness["light"], fairness["target"]
            parts.append(f"## One-token requests beside heavy sampled paths (budget {fairness['budget_tokens']} tokens)\n\n" + _table(
                ["p99 idle ms", "p50 loaded ms", "p99 loaded ms", "target p99 < 1 s", "over-budget request", "machine"],
                [[light["idle_p99_ms"], light["loaded_p50_ms"], light["loaded_p99_ms"],
                  "met" if target["met"] else "MISSED", fairness["over_budget"]["status"], machine]],
            ))  # fmt: skip
    if "attention_map" in results:
        attention = results["attention_map"]
        parts.append(
            f"## Where the next forecast looks ({attention['series']}, {attention['context_length']} bars)\n\n"
            + _table(
                ["attention mass on the last N bars", *attention["mass_within_last"].keys(), "mean lag", "machine"],
                [["share", *attention["mass_within_last"].values(), attention["mean_lag"], machine]],
            )
            + "\n\n![attention map](attention_map/attention_map.png)"
        )
    for name, error in report["failures"].items():
        parts.append(f"## {name}: FAILED\n\n`{error}`")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------- plots
def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("stream", "gqa", "cache", "attention", "serve") if name in results]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True, squeeze=False)
    for axis, name in zip(axes[0], panels):
        data = results[name]
        if name == "stream":
            contexts = [int(ctx) for ctx in data["contexts"]]
            axis.plot(contexts, [row["recompute_ms"] for row in data["contexts"].values()], "o-", label="full recompute")
            axis.plot(contexts, [row["incremental_p50_ms"] for row in data["contexts"].values()], "o-", label="KV cache (p50)")
            axis.set(xscale="log", yscale="log", xlabel="context (bars)", ylabel="ms per tick", title="Cache vs recompute")
        elif name == "gqa":
            for flavour in dict.fromkeys(row["attention"] for row in data["rows"]):
                rows = [row for row in data["rows"] if row["attention"] == flavour]
                axis.plot([row["context"] for row in rows], [row["decode_p50_ms"] for row in rows], "o-", label=flavour)
            axis.set(xscale="log", xlabel="context (bars)", ylabel="decode p50 ms", title="MHA / GQA / MQA")
        elif name == "cache":
            full_bytes = data["window"]["full"]["bytes_held"]
            for policy, row in data["window"].items():
                axis.scatter(row["bytes_held"] / full_bytes, row["nll_change"], label=policy)
            axis.set(xlabel="bytes vs full cache", ylabel="NLL change (nats/bar)", title="Cache policies")
        elif name == "attention":
            for (backend, mode) in dict.fromkeys((row["backend"], row["mode"]) for row in data["rows"]):
                rows = [r for r in data["rows"] if r["backend"] == backend and r["mode"] == mode and "skipped" not in r]
                if rows:
                    axis.plot([r["context"] for r in rows], [r["peak_extra_mib"] for r in rows], "o-", label=f"{backend} {mode}")
            axis.set(xscale="log", yscale="log", xlabel="prompt length", ylabel="peak extra MiB", title="Prefill memory")
        elif name == "serve":
            throughput = data["throughput"]
            axis.bar(["Transformers", "vLLM"], [throughput["hf_forecasts_per_s"], throughput["vllm_forecasts_per_s"]])
            axis.set(ylabel="forecasts per second", title="Sampled forecasts throughput")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
