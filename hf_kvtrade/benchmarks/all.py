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
from pathlib import Path

from ._common import machine_info, report_machine, write_json

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
def render_markdown(report: dict) -> str:
    """report.md: each benchmark's own markdown, in the order of SECTIONS, then the failures."""
    parts = [
        f"# hf-kvtrade benchmark report\n\nRun {report['started']} on {report_machine(report['machine'])}"
        f"{' (quick mode)' if report['quick'] else ''}. Every row below was measured in this one run.\n"
    ]
    results = report["results"]
    modules = {name: importlib.import_module(f"{__package__}.{name}") for name in SECTIONS if name in results}
    parts += [module.markdown(results[name]) for name, module in modules.items()]
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
