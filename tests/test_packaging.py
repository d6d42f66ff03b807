"""What a user gets from `pip install` (not `-e`): the shipped model and presets as package data, loaded through
importlib.resources, and a checkpoint folder whose remote code is the package's own."""

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from hf_kvtrade.checkpoint import REMOTE_CODE_MODULES, SHIPPED_CHECKPOINT, load_checkpoint, stale_remote_code

REPO = Path(__file__).resolve().parent.parent


def test_shipped_checkpoint_carries_the_package_model_code():
    # Regenerate with hf_kvtrade.checkpoint.refresh_remote_code(SHIPPED_CHECKPOINT) after changing the model code.
    assert stale_remote_code(SHIPPED_CHECKPOINT) == []
    assert set(REMOTE_CODE_MODULES) <= {path.name for path in SHIPPED_CHECKPOINT.iterdir()}


@pytest.mark.parametrize("missing", ["folder", "weights"])
def test_a_missing_checkpoint_is_an_error_naming_the_path(tmp_path, missing):
    path = tmp_path / "ckpt"
    if missing == "weights":
        path.mkdir()
        (path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at '{path}'"):
        load_checkpoint(path)


def test_cli_reports_a_missing_checkpoint_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hf_kvtrade.cli", "forecast", "--checkpoint", str(tmp_path / "nowhere")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"kvtrade forecast: no checkpoint at '{tmp_path / 'nowhere'}'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_wheel_installed_without_editable_forecasts_from_another_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(wheels), str(REPO)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("hf_kvtrade-*.whl")
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True
    ).stdout.strip()
    # The dependencies come from this environment's site-packages, added as a plain path: its .pth files (among
    # them the editable install of this repository) are not run, so hf_kvtrade can only come from the wheel.
    (Path(purelib) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A PYTHONPATH pointing at a checkout would shadow the wheel under test.
    environ = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    located = subprocess.run(
        [python, "-c", "import hf_kvtrade.checkpoint as c, hf_kvtrade.presets as p; print(c.SHIPPED_CHECKPOINT); print(p.available_presets())"],
        check=True, capture_output=True, text=True, cwd=elsewhere, env=environ,
    ).stdout  # fmt: skip
    assert located.startswith(purelib) and "['base', 'small', 'tiny']" in located
    result = subprocess.run(
        [environment / "bin" / "kvtrade", "forecast", "--horizon", "1"], capture_output=True, text=True, cwd=elsewhere, env=environ
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "t+1: P(up)=" in result.stdout
