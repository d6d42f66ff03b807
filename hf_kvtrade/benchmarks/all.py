"""Every benchmark side by side in one run: report.json, report.md (tables) and report.png under --out.

Each benchmark is called through its own command-line arguments, so `kvtrade bench all` measures exactly what
`kvtrade bench NAME` measures.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import traceback
from functools import partial
from pathlib import Path

from ._common import machine_info, verdict, write_json

# Order: the cheap, central comparisons first, so a failure late in the run still leaves them in the report.
SECTIONS = ("stream", "batch", "gqa", "cache", "orderbook", "attention", "serve", "attention_map")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/bench", help="folder for report.json, report.md and plots")
    parser.add_argument("--quick", action="store_true", help="every benchmark in its --quick mode (under 5 minutes)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these benchmarks")


def run(args) -> int:
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
    # attention_map writes its plot beside its JSON in a folder; it is one forward pass, with no --quick.
    path = out / name / "attention_map.json" if name == "attention_map" else out / f"{name}.json"
    argv = ["--out", str(path.parent)] if name == "attention_map" else ["--json", str(path)]
    if quick and parser.get_default("quick") is not None:  # None: the benchmark has no --quick
        argv.append("--quick")
    status = module.run(parser.parse_args(argv))
    if status:
        raise RuntimeError(f"bench {name} exited with status {status}")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------- markdown
# The plain tables of report.md: title (formatted with the benchmark's JSON), where its rows are (a list, or a dict
# whose keys become the field "name"), and {header: a row's field, blank where it has none, or a function of the row}.
TABLES = {
    "stream": ("KV cache vs full recompute, per tick", "contexts", {
        "context": "name", "incremental p50 ms": "incremental_p50_ms", "floor ms": "read_weights_and_cache_ms",
        "p50 / floor": "p50_over_floor", "recompute ms": "recompute_ms", "recompute / p50": "recompute_over_p50",
    }),
    "batch": ("Batched ticks (update_many) vs one update per symbol", "results", {
        "symbols": "symbols", "batched ticks/s": "batched_ticks_per_s", "sequential ticks/s": "sequential_ticks_per_s",
        "speedup": "speedup", "CPU-time speedup": "cpu_speedup", "step p50 ms": "batch_step_p50_ms",
        "step p99 ms": "batch_step_p99_ms",
    }),
    "gqa": ("MHA vs GQA vs MQA at equal width", "rows", {
        "attention": "attention", "kv heads": "num_key_value_heads", "context": "context",
        "cache bytes/token": "cache_bytes_per_token", "decode p50 ms": "decode_p50_ms",
        "cache vs MHA": "cache_reduction_vs_mha", "speed vs MHA": "decode_speedup_vs_mha",
    }),
    "orderbook": (
        "Order-book replay ({order_events:,} events, capture peak {peak_live_events_per_s:,.0f}/s)", "rows", {
            "path": "name", "events/s": "events_per_s", "ticks/s": "ticks_per_s", "tick p50 ms": "p50_tick_ms",
            "tick p99 ms": "p99_tick_ms", "cache bytes": "cache_bytes",
        },
    ),
    "attention": ("Attention backends at long context (prefill)", "rows", {
        "backend": "backend", "context": "context", "mode": "mode", "prefill s": "prefill_s",
        "peak extra MiB": "peak_extra_mib",
        "memory vs eager": lambda row: row.get("memory_vs_eager", row.get("chunked_memory_reduction")),
        "skipped": "skipped",
    }),
}


def _machine_label(info: dict) -> str:
    return f"{info.get('cpu', '?')} ({info.get('cores', '?')} cores, {info.get('device', 'cpu')})"


def _table(title: str, headers: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "" if value is None else str(value)

    lines = [f"## {title}\n", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _plain_table(name: str, data: dict) -> str:
    """The table of ``TABLES[name]``, each row ending with its machine (its own, else the benchmark's)."""
    title, where, columns = TABLES[name]
    rows = data[where]
    rows = [{"name": key, **row} for key, row in rows.items()] if isinstance(rows, dict) else rows
    cells = [
        [key(row) if callable(key) else row.get(key) for key in columns.values()]
        + [_machine_label(row.get("machine") or data["machine"])]
        for row in rows
    ]
    return _table(title.format(**data), [*columns, "machine"], cells)


def _orderbook(data: dict) -> str:
    return _plain_table("orderbook", data) + (
        f"\n\nHeadroom over the peak: {data['headroom']:.1f}x (target {data['target_headroom']:.0f}x: "
        f"{verdict(data['target_met'])})."
    )


def _cache(data: dict) -> str:
    def row_cells(setting: str, name: str, row: dict) -> list:
        share, target = row["share_of_edge"], row.get("target")
        met = "" if target is None else f"≤{100 * target['limit']:.0f}%: {verdict(target['met'])}"
        machine = _machine_label(data["machine"])
        return [setting, name, row["bytes_held"], row["nll_change"], None if share is None else 100 * share, met, machine]

    long_stream = data["long_stream"]
    setting = f"W={data['context_policy']['window']}"
    return _table(
        "Cache policies: bytes and nats per bar lost",
        ["setting", "policy", "bytes held", "NLL change nats/bar", "% of edge over uncond. t", "target", "machine"],
        [row_cells(setting, name, row) for name, row in data["window"].items()]
        + [row_cells(f"{long_stream['stream_ticks_before_first_scored_bar']}-tick stream", "sink", long_stream)],
    )


def _serve(data: dict) -> str:
    throughput, prefix, machine = data["throughput"], data["prefix"], _machine_label(data["machine"])
    parts = [_table("Transformers vs vLLM serving", ["measure", "Transformers / cold", "vLLM / warm", "ratio", "machine"], [
        ["forecasts per second", throughput["hf_forecasts_per_s"], throughput["vllm_forecasts_per_s"],
         throughput["ratio"], machine],
        ["new-bar latency ms (prefix cold vs warm)", prefix["cold_ms"], prefix["warm_ms"], prefix["ratio"], machine],
    ])]
    if "fairness" in data:
        fairness = data["fairness"]
        light = fairness["light"]
        parts.append(_table(
            f"One-token requests beside heavy sampled paths (budget {fairness['budget_tokens']} tokens)",
            ["p99 idle ms", "p50 loaded ms", "p99 loaded ms", "target p99 < 1 s", "over-budget request", "machine"],
            [[light["idle_p99_ms"], light["loaded_p50_ms"], light["loaded_p99_ms"], verdict(fairness["target"]["met"]),
              fairness["over_budget"]["status"], machine]],
        ))
    return "\n\n".join(parts)


def _attention_map(data: dict) -> str:
    mass = data["mass_within_last"]
    return _table(
        f"Where the next forecast looks ({data['series']}, {data['context_length']} bars)",
        ["attention mass on the last N bars", *mass.keys(), "mean lag", "machine"],
        [["share", *mass.values(), data["mean_lag"], _machine_label(data["machine"])]],
    ) + "\n\n![attention map](attention_map/attention_map.png)"


SECTION_RENDERERS = {name: partial(_plain_table, name) for name in TABLES} | {
    "orderbook": _orderbook, "cache": _cache, "serve": _serve, "attention_map": _attention_map
}


def render_markdown(report: dict) -> str:
    parts = [
        f"# hf-kvtrade benchmark report\n\nRun {report['started']} on {_machine_label(report['machine'])}"
        f"{' (quick mode)' if report['quick'] else ''}. Every row below was measured in this one run.\n"
    ]
    parts += [SECTION_RENDERERS[name](report["results"][name]) for name in SECTIONS if name in report["results"]]
    parts += [f"## {name}: FAILED\n\n`{error}`" for name, error in report["failures"].items()]
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
