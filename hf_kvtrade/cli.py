"""The `kvtrade` command. Each module in `hf_kvtrade.commands` adds one subcommand through `register(subparsers)`.

Command modules keep their heavy imports inside the functions they run, so `kvtrade --help` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtrade", description="Transformer forecasting of market data with fast KV caches."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda info: info.name):
        importlib.import_module(f"{commands.__name__}.{module_info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FileNotFoundError as error:
        # A missing checkpoint or data file: say which, without a traceback.
        raise SystemExit(f"kvtrade {args.command}: {error}") from None


if __name__ == "__main__":
    raise SystemExit(main())
