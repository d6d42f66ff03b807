"""The streaming engine against full forward passes: every tick, every policy, through eviction and sliding."""

import asyncio
import json

import numpy as np
import pytest
import torch

from hf_kvtrade import KVTradeForCausalLM
from hf_kvtrade.context import ContextPolicy
from hf_kvtrade.presets import load_preset
from hf_kvtrade.signals import Signal
from hf_kvtrade.cache import kv_cache_bytes
from hf_kvtrade.checkpoint import SHIPPED_CHECKPOINT, load_checkpoint
from hf_kvtrade.streaming import StreamingForecaster


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return KVTradeForCausalLM(load_preset("tiny", max_position_embeddings=512)).eval()


def random_walk(length, seed, scale=0.01):
    rng = np.random.default_rng(seed)
    return 100.0 * np.exp(np.cumsum(rng.normal(0.0, scale, length)))


@torch.inference_mode()
def full_forward_bin_probs(model, ids):
    """Next-bar bin probabilities after every prefix of ``ids``, from one cache-free forward pass."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    probs = torch.softmax(logits.double(), dim=-1)[:, 4:]
    return (probs / probs.sum(-1, keepdim=True)).numpy()


def test_full_policy_matches_full_forward_at_every_tick(model):
    engine = StreamingForecaster(model)
    prices = random_walk(300, seed=1)
    ticks = [engine.update("spx", price) for price in prices]
    reference = full_forward_bin_probs(model, engine.history("spx"))
    for step, tick in enumerate(ticks):
        np.testing.assert_allclose(tick.distribution.probs, reference[step], atol=1e-6, err_msg=f"tick {step}")
    # One token of compute per tick: only the first bar went through a prefill.
    assert engine.tokens_computed == len(prices)
    assert engine.prefills == 1


def test_rebases_follow_the_context_policy_past_its_window(model):
    policy = ContextPolicy(window=40, stride=16)
    engine = StreamingForecaster(model, context_policy=policy)
    for step, price in enumerate(random_walk(100, seed=2)):
        tick = engine.update("spx", price)
        context = engine.context_ids("spx")
        history = engine.history("spx")
        # The context plus the forecast bar fit the window; the anchor is the policy's, a multiple of the stride.
        assert len(context) < 40
        assert context == history[policy.start(len(history)) :]
        np.testing.assert_allclose(
            tick.distribution.probs, full_forward_bin_probs(model, context)[-1], atol=1e-6, err_msg=f"tick {step}"
        )
    # A prefill at the first bar, then one at each anchor move: histories of 40, 56, 72 and 88 tokens.
    assert engine.prefills == 5


@pytest.mark.parametrize("policy, max_total_variation", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_policies_track_full_forward_within_their_error(model, policy, max_total_variation):
    engine = StreamingForecaster(model, cache_policy=policy, cache_kwargs={"residual_length": 32})
    prices = random_walk(300, seed=3)
    ticks = [engine.update("spx", price) for price in prices]
    reference = full_forward_bin_probs(model, engine.history("spx"))
    total_variation = np.array([0.5 * np.abs(t.distribution.probs - r).sum() for t, r in zip(ticks, reference)])
    # Until the first block is quantized the cache is exact.
    assert total_variation[:32].max() < 1e-6
    assert total_variation.max() < max_total_variation
    assert total_variation[32:].max() > 0  # quantization really happened


def test_sink_policy_runs_past_the_training_context_in_constant_memory():
    torch.manual_seed(0)
    model = KVTradeForCausalLM(load_preset("tiny", max_position_embeddings=96)).eval()
    engine = StreamingForecaster(model, cache_policy="sink", cache_kwargs={"num_sink_tokens": 4, "window": 60})
    prices = random_walk(model.config.max_position_embeddings + 60, seed=4)
    ticks = [engine.update("spx", price) for price in prices]
    # While everything fits in sinks + window the sink cache is the full cache.
    reference = full_forward_bin_probs(model, engine.history("spx")[:64])
    for step in range(64):
        np.testing.assert_allclose(ticks[step].distribution.probs, reference[step], atol=1e-6)
    assert engine.prefills == 1
    assert engine.session_bytes("spx") == kv_cache_bytes(model.config, 64)
    assert all(np.isfinite(tick.prob_up) for tick in ticks)


@pytest.mark.parametrize("selection", ["recency", "hybrid"])
def test_selective_policy_is_exact_until_its_budget_then_bounded(selection):
    torch.manual_seed(0)
    # A window longer than the stream, so no rebase; hybrid switches the model to eager attention.
    model = KVTradeForCausalLM(load_preset("tiny", max_position_embeddings=128)).eval()
    engine = StreamingForecaster(model, cache_policy="selective", cache_kwargs={"budget": 40, "policy": selection})
    ticks = [engine.update("spx", price) for price in random_walk(100, seed=5)]
    reference = full_forward_bin_probs(model, engine.history("spx")[:40])
    for step in range(40):
        np.testing.assert_allclose(ticks[step].distribution.probs, reference[step], atol=1e-5)
    assert engine.session_cache("spx").num_tokens_held() == 40
    assert engine.prefills == 1


def test_eviction_and_reprefill_restore_the_same_forecasts(model):
    symbols = ["a", "b", "c"]
    series = {symbol: random_walk(40, seed=10 + i) for i, symbol in enumerate(symbols)}
    session_bytes = kv_cache_bytes(model.config, 64)
    budget = 2 * session_bytes + session_bytes // 2  # room for two sessions, never three
    policy = ContextPolicy(window=64, stride=32)
    bounded = StreamingForecaster(model, context_policy=policy, memory_budget_bytes=budget)
    unbounded = StreamingForecaster(model, context_policy=policy)
    for step in range(40):
        for symbol in symbols:
            tick = bounded.update(symbol, series[symbol][step])
            expected = unbounded.update(symbol, series[symbol][step])
            assert bounded.cache_bytes() <= budget
            np.testing.assert_allclose(tick.distribution.probs, expected.distribution.probs, atol=1e-6)
    assert bounded.evictions > 0
    assert bounded.peak_cache_bytes <= budget

    before = bounded.forecast("a")
    bounded.evict("a")
    assert not bounded.is_resident("a")
    after = bounded.forecast("a")
    assert bounded.is_resident("a")
    np.testing.assert_allclose(after.distribution.probs, before.distribution.probs, atol=1e-6)


def test_an_evicted_sessions_slot_is_reused_exactly(model):
    policy = ContextPolicy(window=64, stride=32)
    slot_bytes = kv_cache_bytes(model.config, 64)
    bounded = StreamingForecaster(model, context_policy=policy, memory_budget_bytes=2 * slot_bytes)
    unbounded = StreamingForecaster(model, context_policy=policy)
    series = {symbol: random_walk(40, seed=100 + i) for i, symbol in enumerate("abc")}
    # a and b fill both slots; c then takes a's slot, whose 20 tokens past c's own the mask must hide; a comes back
    # into b's slot.
    for step in range(40):
        symbols = ("a", "b") if step < 20 else ("c", "b") if step < 30 else ("a", "c")
        bars = {symbol: series[symbol][step] for symbol in symbols}
        ticks, expected = bounded.update_many(bars), unbounded.update_many(bars)
        for symbol in symbols:
            np.testing.assert_allclose(
                ticks[symbol].distribution.probs,
                expected[symbol].distribution.probs,
                atol=1e-6,
                err_msg=f"{symbol} {step}",
            )
        assert bounded.cache_bytes() == 2 * slot_bytes
    pool = bounded.sessions.pool
    assert bounded.evictions == 2 and pool.slots == 2
    assert pool.slots_of([bounded.session_cache("c"), bounded.session_cache("a")]) == [0, 1]
    assert bounded.session_cache("c").layers[0].keys.data_ptr() == pool.keys[0][0].data_ptr()
    assert bounded.session_bytes("c") == slot_bytes
    # The unbounded pool doubled to 4 slots for 3 sessions and counts all 4: they are allocated.
    assert unbounded.sessions.pool.slots == 4 and unbounded.cache_bytes() == 4 * slot_bytes


@torch.inference_mode()
def test_pooled_decode_step_equals_the_per_row_step(model):
    from hf_kvtrade.cache import FullKVCache
    from hf_kvtrade.streaming.decoder import BatchedDecoder
    from hf_kvtrade.streaming.slots import SlotPool

    decoder = BatchedDecoder(model)
    pool = SlotPool(model.config, capacity=48, dtype=torch.float32, device="cpu")
    pool.grow(3)
    rng = np.random.default_rng(7)
    histories = [rng.integers(4, model.config.vocab_size, length).tolist() for length in (10, 30, 3)]
    pooled = [pool.acquire() for _ in histories]
    separate = [FullKVCache(model.config, capacity=48, dtype=torch.float32) for _ in histories]
    for ids, in_pool, own in zip(histories, pooled, separate):
        torch.testing.assert_close(decoder.prefill(ids, in_pool, 0), decoder.prefill(ids, own, 0))
    # Slots in one ascending run (the pool read is a view), then permuted (a gather), and across a growth of the
    # pool that re-binds the live caches.
    for step, order in enumerate([[0, 1, 2], [2, 0, 1], [1, 2], [0, 1, 2]]):
        if step == 2:
            pool.grow(6)
        tokens = rng.integers(4, model.config.vocab_size, len(order)).tolist()
        got = decoder.step(tokens, [pooled[row] for row in order], pool=pool)
        expected = decoder.step(tokens, [separate[row] for row in order])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for in_pool, own in zip(pooled, separate):
        assert in_pool.get_seq_length() == own.get_seq_length()
        for pool_layer, own_layer in zip(in_pool.layers, own.layers):
            torch.testing.assert_close(pool_layer.filled(), own_layer.filled(), atol=1e-5, rtol=0)
    assert pool.nbytes() == 6 * kv_cache_bytes(model.config, 48)
    pool.release(pooled[1])
    assert pool.slots_of([pool.acquire()]) == [1]
    with pytest.raises(ValueError, match="slot of the pool"):
        decoder.step([5, 5], [pooled[0], separate[0]], pool=pool)


def test_growing_quantized_caches_stay_under_the_budget(model):
    budget = 3 * kv_cache_bytes(model.config, 30)
    engine = StreamingForecaster(model, cache_policy="int8", memory_budget_bytes=budget)
    for step, price in enumerate(random_walk(50, seed=20)):
        for symbol in ("a", "b", "c"):
            engine.update(symbol, price * (1 + 0.01 * ord(symbol)))
            assert engine.cache_bytes() <= budget
    assert engine.evictions > 0


def test_market_prefix_is_computed_once_and_shared_by_each_session(model):
    engine = StreamingForecaster(model)
    index = random_walk(50, seed=30)
    engine.set_market_context(index)
    series = {symbol: random_walk(40, seed=31 + i) for i, symbol in enumerate(["a", "b", "c"])}
    ticks = {symbol: [engine.update(symbol, price) for price in prices] for symbol, prices in series.items()}
    # The prefix ran once; each session then computed only its own tokens.
    assert engine.tokens_computed == len(index) + sum(len(prices) for prices in series.values())
    prefix_ids = engine.tokenizer.encode(index).tolist()
    for symbol, symbol_ticks in ticks.items():
        reference = full_forward_bin_probs(model, prefix_ids + engine.history(symbol))[len(prefix_ids) :]
        for tick, expected in zip(symbol_ticks, reference):
            np.testing.assert_allclose(tick.distribution.probs, expected, atol=1e-6)


def test_sessions_read_the_market_prefix_by_reference(model):
    index = random_walk(50, seed=70)
    series = {symbol: random_walk(12 + 9 * i, seed=71 + i) for i, symbol in enumerate(["a", "b", "c"])}
    batched, sequential = StreamingForecaster(model), StreamingForecaster(model)
    for engine in (batched, sequential):
        engine.set_market_context(index)
        for symbol, prices in series.items():
            engine.prime(symbol, prices)
    for step, bars in enumerate(zip(*(random_walk(5, seed=80 + i) for i in range(3)))):
        ticks = batched.update_many(dict(zip(series, bars)))
        for symbol, bar in zip(series, bars):
            expected = sequential.update(symbol, bar)
            np.testing.assert_allclose(ticks[symbol].distribution.probs, expected.distribution.probs, atol=1e-6)
    # The tiny model keeps 2 layers x (K + V) x 2 KV heads x 32 dims x 4 bytes = 1 KiB per token. The prefix is its
    # 50 tokens once; each session holds buffers for the 512 - 50 tokens of its own window, none of the prefix.
    assert batched.cache_bytes() == 1024 * 50 + 3 * 1024 * (512 - 50)
    assert batched.session_bytes("a") == 1024 * (512 - 50)
    for symbol in series:
        assert batched.session_cache(symbol).num_tokens_held() == len(batched.history(symbol))


@pytest.mark.parametrize("policy, kwargs", [("int8", {"residual_length": 64}), ("selective", {"budget": 100, "policy": "recency"})])
def test_other_policies_read_the_market_prefix_by_reference(model, policy, kwargs):
    # Budgets too large to quantize or evict within the stream, so the caches are exact behind the prefix.
    engine = StreamingForecaster(model, cache_policy=policy, cache_kwargs=kwargs)
    index = random_walk(30, seed=90)
    engine.set_market_context(index)
    ticks = [engine.update("a", price) for price in random_walk(40, seed=91)]
    prefix_ids = engine.tokenizer.encode(index).tolist()
    reference = full_forward_bin_probs(model, prefix_ids + engine.history("a"))[len(prefix_ids) :]
    for tick, expected in zip(ticks, reference):
        np.testing.assert_allclose(tick.distribution.probs, expected, atol=1e-5)
    assert engine.session_cache("a").num_tokens_held() == 40


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(SHIPPED_CHECKPOINT)


def test_update_many_equals_one_update_per_symbol_on_the_shipped_checkpoint(shipped):
    model, tokenizer = shipped
    policy = ContextPolicy.from_config(model.config)
    window = policy.window
    histories = {
        "long": random_walk(2 * window + 100, seed=50),  # past the window, between two rebases
        "rebasing": random_walk(window - 1, seed=51),  # its next bar moves the anchor
        "short": random_walk(100, seed=52),
    }
    batched, sequential = StreamingForecaster(model, tokenizer), StreamingForecaster(model, tokenizer)
    for engine in (batched, sequential):
        for symbol, prices in histories.items():
            engine.prime(symbol, prices)
    assert batched.sessions["rebasing"].anchor == 0
    future = {symbol: random_walk(5, seed=60 + i) for i, symbol in enumerate([*histories, "new"])}
    for step in range(5):
        bars = {symbol: prices[step] for symbol, prices in future.items()}
        ticks = batched.update_many(bars)
        for symbol, bar in bars.items():
            expected = sequential.update(symbol, bar)
            np.testing.assert_allclose(
                ticks[symbol].distribution.probs, expected.distribution.probs, atol=1e-5, err_msg=f"{symbol} {step}"
            )
            assert ticks[symbol].context_tokens == expected.context_tokens
    assert batched.sessions["rebasing"].anchor == policy.stride
    assert batched.context_ids("long") == sequential.context_ids("long")
    assert len(batched.context_ids("long")) > window // 2
    # Per batch: at most one prefill per symbol (the new one and the rebase), every other tick one batched token.
    assert batched.prefills == sequential.prefills == len(histories) + 2


def test_asyncio_feeds_give_the_same_ticks_as_direct_updates(model):
    series = {"a": random_walk(30, seed=40), "b": random_walk(30, seed=41)}

    async def replay():
        engine = StreamingForecaster(model)
        feeds = {symbol: asyncio.Queue() for symbol in series}
        signals = asyncio.Queue()
        for symbol, prices in series.items():
            for price in prices:
                feeds[symbol].put_nowait({"close": price})
            feeds[symbol].put_nowait(None)
        ticks = await engine.consume(feeds, signals)
        return ticks, signals.qsize()

    ticks, emitted = asyncio.run(replay())
    assert emitted == len(ticks) == 60
    direct = StreamingForecaster(model)
    expected = {symbol: [direct.update(symbol, price).prob_up for price in prices] for symbol, prices in series.items()}
    for symbol in series:
        assert [tick.prob_up for tick in ticks if tick.symbol == symbol] == pytest.approx(expected[symbol], abs=1e-9)
        assert all(isinstance(tick.signal, Signal) for tick in ticks)


def test_latency_statistics_and_bar_formats(model):
    engine = StreamingForecaster(model)
    engine.update("a", 100.0)
    engine.update("a", {"close": 101.0, "timestamp": 2})
    tick = engine.update("a", type("Bar", (), {"close": 100.5, "timestamp": 3})())
    assert tick.timestamp == 3 and tick.forecast.last_price == 100.5
    stats = engine.latency_stats()
    assert stats["ticks"] == 3 and 0 < stats["p50_ms"] <= stats["p99_ms"]
    assert stats["cache_bytes"] == kv_cache_bytes(model.config, 512)


@pytest.mark.parametrize(
    "bar, message",
    [(-1.0, "positive"), (float("nan"), "positive"), ("abc", "number"), ({"open": 1.0}, "close")],
)
def test_bad_bars_are_rejected(model, bar, message):
    with pytest.raises(ValueError, match=message):
        StreamingForecaster(model).update("a", bar)


def test_bad_settings_are_rejected(model):
    with pytest.raises(ValueError, match="cache_policy"):
        StreamingForecaster(model, cache_policy="lru")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        StreamingForecaster(model, context_policy=ContextPolicy(window=10_000, stride=5_000))
    engine = StreamingForecaster(model, memory_budget_bytes=1024)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        engine.update("a", 100.0)
    engine = StreamingForecaster(model)
    engine.update("a", {"close": 100.0, "timestamp": 5})
    with pytest.raises(ValueError, match="not after"):
        engine.update("a", {"close": 100.0, "timestamp": 5})


def test_stream_benchmark_writes_the_documented_layout(tmp_path, model):
    from argparse import Namespace

    from hf_kvtrade import Forecaster
    from hf_kvtrade.benchmarks import stream

    Forecaster(model).save_pretrained(tmp_path / "tiny")
    path = tmp_path / "stream.json"
    args = Namespace(
        json=str(path), checkpoint=str(tmp_path / "tiny"), contexts=[48, 64], ticks=8, repeats=1,
        threads=1, policy="full", quick=False,
    )
    assert stream.run(args) == 0
    report = json.loads(path.read_text())
    assert report["model"] == f"checkpoint {tmp_path / 'tiny'}"
    assert set(report["contexts"]) == {"48", "64"}
    for context in ("48", "64"):
        entry = report["contexts"][context]
        assert entry["ticks"] == 8
        # One session whose buffers hold the widened timing window of 512 tokens at 2 layers x (K + V) x 2 KV
        # heads x 32 dims x 4 bytes = 1 KiB per token.
        assert entry["cache_bytes"] == 512 * 1024
        assert entry["read_weights_and_cache_ms"] > 0 and entry["recompute_ms"] > 0
    assert {report["targets"]["p50_over_floor"]["verdict"], report["targets"]["flatness"]["verdict"]} <= {"met", "MISSED"}


def test_torch_summary_equals_the_numpy_distribution_maths():
    from hf_kvtrade.distribution import BinnedDistribution
    from hf_kvtrade.streaming.summary import ForecastSummarizer
    from hf_kvtrade.tokenization_kvtrade import ReturnTokenizer

    tokenizer = ReturnTokenizer()
    logits = torch.randn(6, tokenizer.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    logits[1, 500:700] = -float("inf")  # empty bins: flat stretches of the CDF around the median
    logits[2, tokenizer.first_bin_id + 10] = 40.0  # nearly all mass in one bin
    levels = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
    forecasts = ForecastSummarizer(tokenizer, levels)(logits, [100.0 + row for row in range(6)])
    for row, forecast in enumerate(forecasts):
        reference = BinnedDistribution.from_token_probs(torch.softmax(logits[row], -1).numpy(), tokenizer)
        np.testing.assert_allclose(forecast.distribution.probs, reference.probs, atol=1e-12)
        np.testing.assert_allclose(forecast.return_quantiles[0], reference.quantile(levels), atol=1e-9)
        assert forecast.prob_up[0] == pytest.approx(reference.prob_up(), abs=1e-12)
        assert forecast.mean_return[0] == pytest.approx(reference.mean(), abs=1e-12)
        assert forecast.last_price == 100.0 + row
