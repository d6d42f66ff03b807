import json
import subprocess
import sys

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from hf_kvtrade import KVTradeConfig, KVTradeForCausalLM, ReturnTokenizer
from hf_kvtrade.presets import available_presets, load_preset


def token_ids(prices, length=None):
    ids = ReturnTokenizer().encode(prices)
    return torch.as_tensor(ids[:length]).unsqueeze(0)


@torch.no_grad()
def stepwise_logits(model, input_ids, prefill):
    cache = DynamicCache(config=model.config)
    logits = [model(input_ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for position in range(prefill, input_ids.shape[1]):
        logits.append(model(input_ids[:, position : position + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa"])
def test_cached_steps_equal_a_full_forward(make_tiny_model, random_walk_prices, attn_implementation, attention):
    model = make_tiny_model(attention)
    model.set_attn_implementation(attn_implementation)
    input_ids = token_ids(random_walk_prices, 200)
    with torch.no_grad():
        full = model(input_ids).logits
    stepwise, _ = stepwise_logits(model, input_ids, prefill=50)
    assert (full - stepwise).abs().max().item() < 1e-4


def test_sliding_window_cache_equals_a_full_forward(make_tiny_model, random_walk_prices):
    model = make_tiny_model(sliding_window=32)
    input_ids = token_ids(random_walk_prices, 150)
    with torch.no_grad():
        full = model(input_ids).logits
    stepwise, cache = stepwise_logits(model, input_ids, prefill=10)
    assert (full - stepwise).abs().max().item() < 1e-4
    assert cache.layers[0].keys.shape[-2] <= 32


def test_cache_bytes_scale_exactly_with_kv_heads(make_tiny_model, random_walk_prices):
    input_ids = token_ids(random_walk_prices, 100)
    bytes_by_heads = {}
    for kv_heads in (4, 2, 1):
        model = make_tiny_model(kv_heads=kv_heads)
        _, cache = stepwise_logits(model, input_ids, prefill=60)
        bytes_by_heads[kv_heads] = sum(
            layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
        )
    per_head = bytes_by_heads[1]
    config = load_preset("tiny")
    assert per_head == 2 * config.num_hidden_layers * 100 * config.head_dim * 4
    assert bytes_by_heads == {4: 4 * per_head, 2: 2 * per_head, 1: per_head}


def test_generate_runs_and_returns_return_tokens(make_tiny_model, random_walk_prices):
    model = make_tiny_model()
    input_ids = token_ids(random_walk_prices, 64)
    output = model.generate(input_ids, max_new_tokens=5, do_sample=True, top_k=0, suppress_tokens=[0, 1, 2, 3])
    assert output.shape == (1, 69)
    assert torch.all(output[:, 64:] >= ReturnTokenizer.num_special_tokens)


def test_save_load_round_trip_gives_identical_logits(make_tiny_model, random_walk_prices, tmp_path):
    model = make_tiny_model()
    model.save_pretrained(tmp_path)
    loaded = KVTradeForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = token_ids(random_walk_prices, 80)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_kvtrade.KVTradeConfig",
        "AutoModel": "modeling_kvtrade.KVTradeModel",
        "AutoModelForCausalLM": "modeling_kvtrade.KVTradeForCausalLM",
    }


def test_trust_remote_code_loads_without_hf_kvtrade(make_tiny_model, random_walk_prices, tmp_path):
    """The Hub path: a fresh process that never imports hf_kvtrade loads the saved folder."""
    model = make_tiny_model()
    model.save_pretrained(tmp_path)
    input_ids = token_ids(random_walk_prices, 40)
    with torch.no_grad():
        expected = model(input_ids).logits[0, -1]
    script = f"""
import sys, torch
from transformers import AutoModel, AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
base = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
assert "hf_kvtrade" not in sys.modules, "hf_kvtrade was imported"
assert type(base).__name__ == "KVTradeModel"
with torch.no_grad():
    logits = model(torch.tensor([{input_ids[0].tolist()}])).logits[0, -1]
print(",".join(repr(x) for x in logits.tolist()))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.tensor([float(x) for x in result.stdout.strip().splitlines()[-1].split(",")])
    assert torch.allclose(logits, expected, atol=1e-6)


def test_auto_classes_know_the_model():
    config = AutoConfig.for_model("kvtrade", num_hidden_layers=1, hidden_size=64, intermediate_size=64)
    assert isinstance(config, KVTradeConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), KVTradeForCausalLM)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"vocab_size": 100}, "vocab_size"),
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, "multiple"),
        ({"head_dim": 33}, "even"),
    ],
)
def test_inconsistent_configs_are_rejected(settings, message):
    # Transformers' strict configs wrap the validator's ValueError in huggingface_hub's validation error.
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        KVTradeConfig(**settings)


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
@pytest.mark.parametrize("attention,expected_kv", [("mha", None), ("gqa", "preset"), ("mqa", 1)])
def test_presets_build_every_flavour(preset, attention, expected_kv):
    config = load_preset(preset, attention=attention)
    if expected_kv is None:
        assert config.num_key_value_heads == config.num_attention_heads
    elif expected_kv == 1:
        assert config.num_key_value_heads == 1
    else:
        assert 1 < config.num_key_value_heads < config.num_attention_heads
    assert config.head_dim in (32, 64)
    assert set(available_presets()) >= {"tiny", "small", "base"}


def test_tiny_preset_is_under_a_million_parameters():
    model = KVTradeForCausalLM(load_preset("tiny"))
    assert model.num_parameters() < 1_000_000


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="tiny"):
        load_preset("huge")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_attention_2 needs a CUDA GPU")
def test_flash_attention_matches_sdpa_on_gpu(random_walk_prices):
    pytest.importorskip("flash_attn")
    config = load_preset("tiny")
    model = KVTradeForCausalLM(config).to("cuda", torch.bfloat16).eval()
    input_ids = token_ids(random_walk_prices, 128).cuda()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        reference = model(input_ids).logits.float()
        model.set_attn_implementation("flash_attention_2")
        flash = model(input_ids).logits.float()
    assert (reference - flash).abs().max().item() < 5e-2
