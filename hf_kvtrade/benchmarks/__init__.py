"""Benchmarks behind `kvtrade bench NAME`: one module each, exposing `add_arguments(parser)` and `run(args)`.

Every benchmark measures its contenders side by side in one run and reports ratios; nothing here is asserted on
timings in tests.
"""
