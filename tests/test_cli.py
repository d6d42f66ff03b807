import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from hf_kvtrade.cli import main

COMMANDS = {"backtest", "bench", "convert-gqa", "demo", "evaluate", "forecast", "orderbook", "serve", "stream", "train"}
BENCHMARKS = {"all", "attention", "attention_map", "batch", "cache", "gqa", "orderbook", "serve", "stream"}


def test_help_lists_every_command_and_benchmark():
    result = subprocess.run([sys.executable, "-m", "hf_kvtrade.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert all(command in result.stdout for command in COMMANDS)
    bench = subprocess.run([sys.executable, "-m", "hf_kvtrade.cli", "bench", "--help"], capture_output=True, text=True)
    assert all(name in bench.stdout for name in BENCHMARKS)


def test_forecast_from_a_csv(tmp_path, capsys, random_walk_prices):
    path = tmp_path / "bars.csv"
    pd.DataFrame({"close": random_walk_prices}).to_csv(path, index=False)
    assert main(["forecast", "--csv", str(path), "--horizon", "3", "--num-samples", "32"]) == 0
    output = capsys.readouterr().out
    assert f"last price {random_walk_prices[-1]:.4f}" in output
    assert output.count("P(up)=") == 3


def test_forecast_names_a_missing_column(tmp_path):
    path = tmp_path / "bars.csv"
    pd.DataFrame({"price": np.linspace(1, 2, 10)}).to_csv(path, index=False)
    with pytest.raises(SystemExit, match="no column 'close'"):
        main(["forecast", "--csv", str(path)])



def test_stream_replays_the_default_series(capsys):
    assert main(["stream", "--limit", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Thirty ticks of the S&P 500, each with a forecast, then the latency summary.
    assert sum("P(up)" in line for line in lines) == 30
    assert lines[-1].startswith("30 ticks")

def _run_in_a_fresh_interpreter(script: str, timeout: int) -> str:
    # A fresh interpreter: this test process has imported torch long ago.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_help_imports_neither_torch_nor_transformers():
    script = (
        "import sys; from hf_kvtrade.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules)\n"
        "assert not heavy, heavy"
    )
    assert "usage: kvtrade" in _run_in_a_fresh_interpreter(script, timeout=120)


def test_the_package_registers_the_auto_classes_on_first_use():
    script = (
        "import hf_kvtrade, sys\n"
        "assert 'transformers' not in sys.modules\n"
        "config = hf_kvtrade.KVTradeConfig()\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "assert type(AutoConfig.for_model('kvtrade')) is hf_kvtrade.KVTradeConfig\n"
        "assert AutoModelForCausalLM.from_config(config).__class__ is hf_kvtrade.KVTradeForCausalLM"
    )
    _run_in_a_fresh_interpreter(script, timeout=300)


def test_the_http_client_needs_neither_torch_nor_transformers():
    script = (
        "import sys; from hf_kvtrade.client import ForecastClient; from hf_kvtrade import Forecast\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules)\n"
        "assert not heavy, heavy"
    )
    _run_in_a_fresh_interpreter(script, timeout=120)
