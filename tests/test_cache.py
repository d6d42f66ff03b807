import pytest
import torch

from hf_kvtrade.cache import (
    FullKVCache,
    QuantizedKVCache,
    SelectiveKVCache,
    SinkKVCache,
    build_cache,
    dequantize,
    kv_cache_bytes,
    pack_int4,
    quantize,
    track_attention,
    unpack_int4,
)


def random_ids(length, batch=1):
    return torch.randint(4, 1028, (batch, length))


@torch.no_grad()
def stream_logits(model, input_ids, cache, prefill):
    """Logits of a prefill of ``prefill`` tokens followed by one-token steps, all through ``cache``."""
    logits = [model(input_ids[:, :prefill], past_key_values=cache).logits]
    for position in range(prefill, input_ids.shape[1]):
        logits.append(model(input_ids[:, position : position + 1], past_key_values=cache).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_at_most_half_a_step(bits):
    tensor = torch.randn(3, 2, 64, 32) * torch.linspace(0.1, 20.0, 32)  # channels of very different ranges
    for dim in (-2, -1):
        codes, scale, zero = quantize(tensor, bits, dim=dim)
        restored = dequantize(codes, scale, zero, bits)
        assert codes.dtype == torch.uint8 and scale.dtype == zero.dtype == torch.float16
        assert (restored - tensor).abs().le(scale.float() / 2 * (1 + 1e-5) + 1e-6).all()
        # relative to the range of each slice: 1/510 of it for int8, 1/30 for int4
        spread = tensor.amax(dim=dim, keepdim=True) - tensor.amin(dim=dim, keepdim=True)
        assert (restored - tensor).abs().le(spread / (2**bits - 1) / 2 * 1.01 + 1e-3).all()


def test_quantization_of_a_constant_slice_is_exact():
    tensor = torch.full((4, 8), 3.0)
    restored = dequantize(*quantize(tensor, 8, dim=-1), bits=8)
    assert torch.equal(restored, tensor)


def test_int4_codes_pack_two_per_byte_and_round_trip():
    codes = torch.randint(0, 16, (5, 7, 32), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 7, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    with pytest.raises(ValueError, match="even"):
        pack_int4(codes[..., :3])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_counts_every_byte(make_tiny_model, bits):
    model = make_tiny_model("gqa")
    config = model.config
    cache = QuantizedKVCache(config, bits=bits, residual_length=16, value_group_size=64)
    stream_logits(model, random_ids(90), cache, prefill=40)
    layers, kv_heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    quantized, residual = 80, 10
    payload = 2 * quantized * kv_heads * head_dim * bits // 8
    key_parameters = 2 * (quantized // 16) * kv_heads * head_dim * 2  # scale + zero, float16, per block and channel
    value_parameters = 2 * quantized * (kv_heads * head_dim // 64) * 2  # scale + zero, float16, per token and group
    full_precision = 2 * residual * kv_heads * head_dim * 4
    assert cache.num_tokens_held() == 90 and cache.get_seq_length() == 90
    assert cache.nbytes() == layers * (payload + key_parameters + value_parameters + full_precision)


@pytest.mark.parametrize("bits, tolerance", [(8, 0.02), (4, 0.3)])
def test_quantized_cache_stays_close_to_the_full_cache(make_tiny_model, bits, tolerance):
    model = make_tiny_model("gqa")
    input_ids = random_ids(120)
    full = stream_logits(model, input_ids, FullKVCache(model.config), prefill=30)
    quantized = stream_logits(model, input_ids, QuantizedKVCache(model.config, bits=bits, residual_length=16), 30)
    assert (quantized - full).abs().max().item() < tolerance


def streaming_reference_logits(model, input_ids, num_sink_tokens, window):
    """Last-token logits of one full forward pass per step, with the StreamingLLM mask and positions made explicit.

    Token ``t`` sees the sinks, the ``window`` tokens before it and itself. Window tokens keep their positions;
    the sinks are moved to sit right before the window (``evicted`` places further on), as a fresh StreamingLLM
    cache of sinks + window would lay them out.
    """
    logits = []
    for step in range(input_ids.shape[1]):
        length = step + 1
        evicted = max(0, step - num_sink_tokens - window)
        visible = torch.zeros(length, dtype=torch.bool)
        visible[:num_sink_tokens] = True
        visible[max(0, step - window) :] = True
        mask = torch.full((1, 1, length, length), torch.finfo(torch.float32).min).triu(1)
        mask[0, 0, -1] = torch.where(visible, 0.0, torch.finfo(torch.float32).min)
        position_ids = torch.arange(length)
        position_ids[: min(num_sink_tokens, length)] += evicted
        with torch.no_grad():
            output = model(input_ids[:, :length], attention_mask=mask, position_ids=position_ids.unsqueeze(0))
        logits.append(output.logits[:, -1:])
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("attention", ["mha", "mqa"])
def test_sink_cache_equals_a_full_forward_with_the_streaming_mask_and_positions(make_tiny_model, attention):
    # With one layer, a token's keys and values depend on the token and its position only, so the per-step
    # full forward pass is the exact reference for every step, evictions included.
    model = make_tiny_model(attention, num_hidden_layers=1)
    model.set_attn_implementation("eager")
    num_sink_tokens, window = 3, 10
    input_ids = random_ids(60)
    cache = SinkKVCache(model.config, num_sink_tokens=num_sink_tokens, window=window)
    held = []
    with torch.no_grad():
        logits = []
        for position in range(input_ids.shape[1]):
            logits.append(model(input_ids[:, position : position + 1], past_key_values=cache).logits)
            held.append(cache.num_tokens_held())
    reference = streaming_reference_logits(model, input_ids, num_sink_tokens, window)
    assert (torch.cat(logits, dim=1) - reference).abs().max().item() < 1e-4
    assert max(held) == num_sink_tokens + window and cache.get_seq_length() == 60


def test_sink_cache_without_sinks_equals_a_sliding_window_forward(make_tiny_model):
    # Without sinks no key is re-rotated, so one full forward pass with a sliding-window mask is the exact
    # reference at every depth.
    model = make_tiny_model("gqa")
    model.set_attn_implementation("eager")
    window = 12
    input_ids = random_ids(50)
    streamed = stream_logits(model, input_ids, SinkKVCache(model.config, num_sink_tokens=0, window=window), 1)
    positions = torch.arange(50)
    visible = (positions[None, :] <= positions[:, None]) & (positions[:, None] - positions[None, :] <= window)
    mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        reference = model(input_ids, attention_mask=mask).logits
    assert (streamed - reference).abs().max().item() < 1e-4


def test_sink_cache_never_grows_past_sinks_plus_window(make_tiny_model):
    model = make_tiny_model("gqa")
    cache = SinkKVCache(model.config, num_sink_tokens=4, window=20)
    with torch.no_grad():
        model(random_ids(100), past_key_values=cache)  # a prefill longer than the cache
        sizes = [cache.nbytes()]
        for _ in range(30):
            model(random_ids(1), past_key_values=cache)
            assert cache.num_tokens_held() == 24
            sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1 and cache.get_seq_length() == 130


@pytest.mark.parametrize("policy", ["h2o", "recency", "hybrid"])
def test_selective_cache_never_exceeds_its_budget(make_tiny_model, policy):
    model = make_tiny_model("gqa")
    model.set_attn_implementation("eager")
    track_attention(model)
    cache, full = SelectiveKVCache(model.config, budget=24, policy=policy, num_sink_tokens=4), FullKVCache(model.config)
    input_ids = random_ids(80)
    with torch.no_grad():
        model(input_ids[:, :40], past_key_values=cache)
        model(input_ids[:, :4], past_key_values=full)
        for position in range(40, 80):
            assert cache.num_tokens_held() <= 24
            model(input_ids[:, position : position + 1], past_key_values=cache)
    assert cache.num_tokens_held() == 24 and cache.get_seq_length() == 80
    for layer, full_layer in zip(cache.layers, full.layers):
        assert layer.keys.shape[-2] == layer.values.shape[-2] == 24
        # the sinks are always the first tokens kept, in every head
        torch.testing.assert_close(layer.keys[..., :4, :], full_layer.filled()[0])


def test_recency_keeps_the_sinks_and_the_newest_tokens(make_tiny_model):
    model = make_tiny_model("gqa")
    full, selective = FullKVCache(model.config), SelectiveKVCache(model.config, budget=16, policy="recency")
    input_ids = random_ids(50)
    stream_logits(model, input_ids, full, prefill=10)
    stream_logits(model, input_ids, selective, prefill=10)
    full_keys = full.layers[0].filled()[0]
    kept = torch.cat([full_keys[..., :4, :], full_keys[..., -12:, :]], dim=-2)
    assert torch.equal(selective.layers[0].keys, kept)


def test_h2o_keeps_the_tokens_that_received_the_most_attention(make_tiny_model):
    model = make_tiny_model("mha")
    model.set_attn_implementation("eager")
    track_attention(model)
    input_ids = random_ids(30)
    with torch.no_grad():
        attentions = model(input_ids, output_attentions=True).attentions
        cache = SelectiveKVCache(model.config, budget=12, policy="h2o", num_sink_tokens=2)
        model(input_ids, past_key_values=cache)
    received = attentions[0].sum(dim=2)  # (batch, heads, tokens): one KV head per query head in MHA
    expected = received[..., 2:].topk(10, dim=-1).indices.sort(dim=-1).values + 2
    full = FullKVCache(model.config)
    with torch.no_grad():
        model(input_ids, past_key_values=full)
    expected_keys = full.layers[0].filled()[0].gather(2, expected.unsqueeze(-1).expand(-1, -1, -1, 32))
    assert torch.equal(cache.layers[0].keys[..., 2:, :], expected_keys)


@pytest.mark.parametrize("policy", ["h2o", "recency", "hybrid"])
def test_selective_cache_with_room_for_everything_equals_the_full_cache(make_tiny_model, policy):
    model = make_tiny_model("gqa")
    model.set_attn_implementation("eager")
    track_attention(model)
    input_ids = random_ids(60, batch=2)
    full = stream_logits(model, input_ids, FullKVCache(model.config), prefill=20)
    selective = stream_logits(model, input_ids, SelectiveKVCache(model.config, budget=100, policy=policy), 20)
    assert torch.equal(selective, full)


def test_attention_policies_explain_what_they_need(make_tiny_model):
    model = make_tiny_model("gqa")
    input_ids = random_ids(10)
    cache = SelectiveKVCache(model.config, budget=8, policy="h2o")
    with torch.no_grad():
        model(input_ids, past_key_values=cache)
        with pytest.raises(RuntimeError, match="track_attention"):
            model(input_ids[:, :1], past_key_values=cache)
        model.set_attn_implementation("sdpa")
        track_attention(model)
        with pytest.raises(ValueError, match="eager"):
            model(input_ids, past_key_values=SelectiveKVCache(model.config, budget=8, policy="h2o"))


@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize(
    "policy, kwargs",
    [
        ("full", {}),
        ("int8", {"residual_length": 8}),
        ("int4", {"residual_length": 8}),
        ("sink", {"num_sink_tokens": 2, "window": 12}),
        ("selective", {"budget": 12}),
    ],
)
def test_generate_runs_with_every_cache(make_tiny_model, attention, policy, kwargs):
    model = make_tiny_model(attention)
    model.set_attn_implementation("eager")
    track_attention(model)
    prompt = random_ids(20, batch=2)
    cache = build_cache(model.config, policy, **kwargs)
    output = model.generate(prompt, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert output.shape == (2, 28) and torch.equal(output[:, :20], prompt)
    assert cache.get_seq_length() == 27  # the last token generated is never fed back
    assert 0 < cache.num_tokens_held() <= 27 and cache.nbytes() > 0


def test_generate_with_room_to_spare_matches_the_full_cache(make_tiny_model):
    model = make_tiny_model("gqa")
    model.set_attn_implementation("eager")
    track_attention(model)
    prompt = random_ids(16)
    expected = model.generate(prompt, max_new_tokens=10, do_sample=False)
    for policy, kwargs in [("sink", {"num_sink_tokens": 4, "window": 40}), ("selective", {"budget": 40})]:
        cache = build_cache(model.config, policy, **kwargs)
        assert torch.equal(model.generate(prompt, past_key_values=cache, max_new_tokens=10, do_sample=False), expected)


def test_bad_arguments_are_named():
    from hf_kvtrade.presets import load_preset

    config = load_preset("tiny")
    with pytest.raises(ValueError, match="policy must be one of"):
        build_cache(config, "int2")
    with pytest.raises(ValueError, match="bits"):
        QuantizedKVCache(config, bits=3)
    with pytest.raises(ValueError, match="window"):
        SinkKVCache(config, window=0)
    with pytest.raises(ValueError, match="budget"):
        SelectiveKVCache(config, budget=4, num_sink_tokens=4)
    with pytest.raises(ValueError, match="policy"):
        build_cache(config, "selective", policy="lru")
    with pytest.raises(ValueError, match="full-attention"):
        FullKVCache(load_preset("tiny", sliding_window=32))


def test_a_full_cache_bound_to_buffers_it_does_not_own_writes_there_and_cannot_grow(make_tiny_model):
    model = make_tiny_model()
    config = model.config
    # Per layer, keys and values of two sessions; the cache gets the second one's.
    storage = torch.zeros(config.num_hidden_layers, 2, 2, config.num_key_value_heads, 12, config.head_dim)
    cache = FullKVCache(config, capacity=12)
    for layer, (keys, values) in zip(cache.layers, storage):
        layer.bind(keys[1:2], values[1:2])
    input_ids = random_ids(12)
    reference = stream_logits(model, input_ids, FullKVCache(config, capacity=12), prefill=8)
    torch.testing.assert_close(stream_logits(model, input_ids, cache, prefill=8), reference)
    assert storage[:, :, 0].eq(0).all() and storage[:, :, 1].ne(0).any()
    assert cache.nbytes() == kv_cache_bytes(config, 12)
    with pytest.raises(ValueError, match="cannot grow"):
        model(random_ids(1), past_key_values=cache)
