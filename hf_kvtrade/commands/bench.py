"""`kvtrade bench NAME`: runs one of the benchmarks in `hf_kvtrade.benchmarks`."""

from __future__ import annotations

import importlib
import pkgutil


def register(subparsers) -> None:
    from .. import benchmarks

    parser = subparsers.add_parser("bench", help="run a side-by-side benchmark and write its JSON")
    bench_subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for module_info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda info: info.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{benchmarks.__name__}.{module_info.name}")
        bench_parser = bench_subparsers.add_parser(module_info.name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(bench_parser)
        bench_parser.set_defaults(func=module.run)
