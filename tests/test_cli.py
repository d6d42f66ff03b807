import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from hf_kvtrade.cli import main

COMMANDS = {"backtest", "bench", "convert-gqa", "demo", "evaluate", "forecast", "serve", "stream", "train"}
BENCHMARKS = {"all", "attention", "attention_map", "cache", "gqa", "serve", "stream"}


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
