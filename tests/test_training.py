import json
import subprocess
import sys

import pytest

from hf_kvtrade.cli import build_parser
from hf_kvtrade.commands.train import reproducible_command, select_frames
from hf_kvtrade.data import load_series
from hf_kvtrade.presets import load_preset
from hf_kvtrade.context import ContextPolicy
from hf_kvtrade.data.windows import IGNORE_INDEX
from hf_kvtrade.synthetic import synthetic_frames
from hf_kvtrade.tokenization_kvtrade import ReturnTokenizer
from hf_kvtrade.training import SyntheticStage, push_to_hub, synthetic_windows, train, write_model_card


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("checkpoint") / "kvtrade-tiny"
    frames = {name: load_series(name) for name in ("sp500", "eurusd_h1")}
    run = train(
        load_preset("tiny"), frames, output_dir, window_length=64, batch_size=8, max_steps=40, eval_steps=20,
        learning_rate=3e-3, seed=0, synthetic=SyntheticStage(num_series=64, max_steps=10, learning_rate=3e-3),
    )  # fmt: skip
    return run, output_dir


@pytest.mark.slow
def test_short_tiny_run_lowers_validation_loss(trained):
    run, _ = trained
    # The synthetic stage alone already lowers the real validation loss; the real stage lowers it further.
    assert run.synthetic_validation_loss < run.initial_validation_loss - 0.3
    assert run.validation_loss < run.synthetic_validation_loss
    assert run.best_step in (20, 40)
    assert {entry["stage"] for entry in run.log_history} == {"synthetic", "real"}
    assert run.num_train_tokens > 0 and run.train_cpu_seconds > 0


def test_synthetic_windows_score_every_bar_of_each_series_once():
    tokenizer, policy = ReturnTokenizer(), ContextPolicy(window=48, stride=16)
    stage = SyntheticStage(num_series=5, max_steps=1, seed=3)
    windows = synthetic_windows(stage, tokenizer, policy)
    frames = list(synthetic_frames(5, 48, seed=3).values())
    assert windows.num_rows == 5
    for row, frame in zip(windows, frames):
        ids = tokenizer.encode(frame["close"].to_numpy())
        # One policy window per series: its first `window` bars, every return a target from the bars before it.
        assert row["input_ids"].tolist() == ids.tolist()
        assert row["labels"][0] == IGNORE_INDEX and row["labels"][1:].tolist() == ids[1:].tolist()


@pytest.mark.slow
def test_saved_checkpoint_is_ready_for_inference(trained):
    _, output_dir = trained
    config = json.loads((output_dir / "config.json").read_text())
    assert config["use_cache"] is True  # the Trainer turns it off; it must be switched back
    assert (config["training_context_length"], config["context_stride"]) == (64, 32)  # the context policy
    generation = json.loads((output_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    assert {"model.safetensors", "configuration_kvtrade.py", "modeling_kvtrade.py"} <= {p.name for p in output_dir.iterdir()}


@pytest.mark.slow
def test_checkpoint_loads_with_remote_code_in_a_fresh_process(trained, tmp_path):
    _, output_dir = trained
    # A fresh interpreter that never imports hf_kvtrade: the Hub path, where only the folder's own code exists.
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        f"model = AutoModelForCausalLM.from_pretrained({str(output_dir)!r}, trust_remote_code=True);"
        "assert 'hf_kvtrade' not in sys.modules, 'loaded the installed package instead of the folder code';"
        "print(model(input_ids=torch.tensor([[1, 500, 520]])).logits.shape)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([1, 3, 1028])" in result.stdout


@pytest.mark.slow
def test_model_card_records_data_periods_command_and_metrics(trained):
    run, output_dir = trained
    from huggingface_hub import ModelCard

    _, sources = select_frames("sp500,eurusd_h1", [])
    write_model_card(run, "kvtrade train --preset tiny", sources)
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "transformers"
    assert "kvtrade train --preset tiny" in card.text
    assert "| sp500 | S&P 500 index, daily OHLCV | `arch`" in card.text
    assert run.periods[0]["test"]["start"][:10] in card.text
    assert f"{run.validation_loss:.4f}" in card.text
    assert "Pretrained for 10 steps" in card.text and "64 synthetic series" in card.text


def test_recorded_command_parses_back_to_the_same_options():
    args = build_parser().parse_args(["train", "--preset", "tiny", "--series", "sp500,msft", "--max-steps", "7"])
    command = reproducible_command(args)
    reparsed = build_parser().parse_args(command.split()[1:])
    assert vars(reparsed) == vars(args)


def test_push_to_hub_uploads_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(
        huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "https://hub/commit/1"
    )
    assert push_to_hub(tmp_path, "someone/kvtrade-small") == "https://hub/commit/1"
    assert calls[0] == ("create", "someone/kvtrade-small", {"private": False, "exist_ok": True})
    assert calls[1][1]["folder_path"] == str(tmp_path) and calls[1][1]["repo_id"] == "someone/kvtrade-small"


def test_unknown_series_and_empty_selection_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown bundled series 'nope'"):
        select_frames("nope", [])
    with pytest.raises(ValueError, match="no training data"):
        train(load_preset("tiny"), {}, tmp_path)
