import json

import numpy as np
import pandas as pd
import pytest
import torch

from hf_kvtrade import Forecaster, KVTradeForCausalLM, ReturnTokenizer
from hf_kvtrade.cli import main
from hf_kvtrade.conversion import convert_checkpoint, mean_pool_kv_heads


def logits(model, input_ids):
    with torch.inference_mode():
        return model(input_ids=input_ids).logits


@pytest.fixture
def input_ids():
    return torch.randint(4, 1028, (2, 40))


def tie_heads_within_groups(model, num_groups):
    """Makes the k/v projections of the heads that will share a group identical; groups stay different."""
    config = model.config
    per_group = config.num_key_value_heads // num_groups
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                heads = projection.weight.view(num_groups, per_group, config.head_dim, -1)
                heads.copy_(heads[:, :1].expand_as(heads).clone())


@pytest.mark.parametrize("attention", ["mha", "gqa"])
def test_same_kv_heads_is_identity(make_tiny_model, input_ids, attention):
    model = make_tiny_model(attention)
    converted = mean_pool_kv_heads(model, model.config.num_key_value_heads)
    torch.testing.assert_close(logits(converted, input_ids), logits(model, input_ids), rtol=0, atol=0)


@pytest.mark.parametrize(("attention", "kv_heads"), [("mha", 2), ("mha", 1), ("gqa", 1)])
def test_pooling_heads_that_are_already_equal_keeps_logits(make_tiny_model, input_ids, attention, kv_heads):
    model = make_tiny_model(attention)
    tie_heads_within_groups(model, kv_heads)
    converted = mean_pool_kv_heads(model, kv_heads)
    assert converted.config.num_key_value_heads == kv_heads
    assert converted.model.layers[0].self_attn.k_proj.out_features == kv_heads * model.config.head_dim
    torch.testing.assert_close(logits(converted, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_pooled_projection_is_the_group_mean(make_tiny_model):
    model = make_tiny_model("mha")
    converted = mean_pool_kv_heads(model, 2)
    head_dim = model.config.head_dim
    source = model.model.layers[1].self_attn.v_proj.weight
    pooled = converted.model.layers[1].self_attn.v_proj.weight
    # Query heads 0 and 1 share the first KV head (repeat_kv groups contiguously).
    torch.testing.assert_close(pooled[:head_dim], (source[:head_dim] + source[head_dim : 2 * head_dim]) / 2)
    torch.testing.assert_close(converted.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)


@pytest.mark.parametrize("kv_heads", [3, 0, 8])
def test_kv_heads_must_divide_the_head_count(make_tiny_model, kv_heads):
    with pytest.raises(ValueError, match="must divide the model's 4 key/value heads"):
        mean_pool_kv_heads(make_tiny_model("mha"), kv_heads)


@pytest.fixture
def price_frame():
    rng = np.random.default_rng(3)
    index = pd.date_range("2020-01-01", periods=700, freq="D", tz="UTC")
    return pd.DataFrame({"close": 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, len(index))))}, index=index)


@pytest.fixture
def mha_checkpoint(tmp_path, make_tiny_model):
    path = tmp_path / "mha"
    model = make_tiny_model("mha", training_context_length=32)
    Forecaster(model, ReturnTokenizer.from_config(model.config)).save_pretrained(path)
    return path


def test_converted_checkpoint_loads_and_runs(tmp_path, mha_checkpoint, price_frame, input_ids):
    destination = tmp_path / "gqa"
    report = convert_checkpoint(
        mha_checkpoint, destination, 2, {"walk": price_frame}, uptrain_steps=2, batch_size=4
    )
    assert set(report["nll"]) == {"source", "converted", "uptrained"}
    assert all(np.isfinite(value) for value in report["nll"].values())
    assert report["num_test_bars"] == 70
    forecaster = Forecaster.from_pretrained(destination)
    assert forecaster.model.config.num_key_value_heads == 2
    assert forecaster.model.config.use_cache
    assert forecaster.predict(price_frame["close"].to_numpy(), horizon=1).prob_up.shape == (1,)
    # Saved through Forecaster: the tokenizer and the remote code travel with the weights.
    assert (destination / "modeling_kvtrade.py").exists()
    auto = KVTradeForCausalLM.from_pretrained(destination)
    torch.testing.assert_close(logits(auto, input_ids), logits(forecaster.model, input_ids))


def test_cli_reports_bad_kv_heads(tmp_path, mha_checkpoint):
    with pytest.raises(ValueError, match="got 3, choose one of \\[1, 2, 4\\]"):
        main(["convert-gqa", str(mha_checkpoint), str(tmp_path / "out"), "--kv-heads", "3", "--series", "sp500"])
    assert not (tmp_path / "out").exists()


def test_cli_writes_report(tmp_path, mha_checkpoint, capsys):
    destination = tmp_path / "mqa"
    main(["convert-gqa", str(mha_checkpoint), str(destination), "--kv-heads", "1", "--series", "sp500"])
    report = json.loads((destination / "conversion.json").read_text())
    assert report["kv_heads"] == 1 and report["series"] == ["sp500"]
    assert "converted" in capsys.readouterr().out
