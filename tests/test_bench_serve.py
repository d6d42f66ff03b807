"""`kvtrade bench serve` at tiny sizes, without a vLLM engine: the windows both sides condition on, the hit-ratio
counting, and the bounded load loop against the naive Transformers server.

Timings are never asserted. The real engine and server are started by tests/test_vllm_engine.py and
tests/test_vllm_server.py only.
"""

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import torch

from hf_kvtrade import Forecaster, KVTradeForCausalLM
from hf_kvtrade.benchmarks import serve
from hf_kvtrade.benchmarks._naive_server import ForecastServer, make_handler
from hf_kvtrade.benchmarks._prefix_hits import full_block_tokens, hit_ratios, ideal_cached_tokens
from hf_kvtrade.client import OfflineForecaster
from hf_kvtrade.context import ContextPolicy
from hf_kvtrade.presets import load_preset
from hf_kvtrade.tokenization_kvtrade import ReturnTokenizer

WINDOW, STRIDE = 64, 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-windowed")
    config = load_preset("tiny", training_context_length=WINDOW, context_stride=STRIDE)
    Forecaster(KVTradeForCausalLM(config)).save_pretrained(path)
    return path


def prompt_side(checkpoint, cls=OfflineForecaster):
    """The vLLM side's prompt builder (the real `encode_context`) without starting an engine."""
    side = cls.__new__(cls)
    side.tokenizer = ReturnTokenizer.from_pretrained(checkpoint)
    side.context_policy = ContextPolicy.from_pretrained(checkpoint)
    return side


def test_both_sides_condition_on_the_same_policy_windows(checkpoint):
    hf = Forecaster.from_pretrained(checkpoint)
    vllm_side = prompt_side(checkpoint)
    histories = serve.random_histories(count=8, bars=200, stride=STRIDE, seed=0)
    assert sorted({len(prices) for prices in histories}) == [200 + 4 * index for index in range(8)]
    for horizon in (1, 8):
        prompts = serve.matched_prompts(hf, vllm_side, histories, horizon)
        for prices, prompt in zip(histories, prompts):
            ids = hf.tokenizer.encode(prices).tolist()
            start = ContextPolicy(WINDOW, STRIDE).start(len(ids), horizon)
            assert prompt == ids[start:]  # the policy's window, not the whole history
            assert len(prompt) + horizon <= WINDOW
    # The stream section's prompts come from the same encode_context, bar by bar.
    stream = serve.stream_prompts(vllm_side, histories[0][:100])
    assert len(stream) == 100 and stream[-1] == serve.matched_prompts(hf, vllm_side, [histories[0][:100]], 1)[0]


def test_different_windows_are_refused(checkpoint):
    hf = Forecaster.from_pretrained(checkpoint)
    other = prompt_side(checkpoint)
    other.context_policy = ContextPolicy(WINDOW, STRIDE // 2)
    with pytest.raises(AssertionError, match="not use the same window"):
        serve.matched_prompts(hf, other, serve.random_histories(4, 200, STRIDE, seed=1), 1)


def test_hit_ratios_by_hand():
    # 40 tokens: 1 full block; 64: 2; 65: 2.
    assert [full_block_tokens(length) for length in (40, 64, 65, 31)] == [32, 64, 64, 0]
    result = hit_ratios([40, 64, 65], [0, 32, 32])
    assert result["prompt_tokens"] == 169 and result["full_block_tokens"] == 160 and result["cached_tokens"] == 64
    assert result["hit_ratio"] == pytest.approx(64 / 169)
    assert result["full_block_hit_ratio"] == pytest.approx(64 / 160)
    with pytest.raises(ValueError):
        hit_ratios([1, 2], [0])


def test_ideal_cache_follows_vllms_block_rules():
    a = list(range(100, 170))  # 70 tokens
    prompts = [
        a,  # cold: 0
        a + [7],  # 71 tokens: its first two blocks were cached by the first prompt: 64
        a[:64],  # ends on a block boundary: vLLM recomputes the last token, so only the first block: 32
        a[32:],  # a new anchor (38 tokens): the chain of blocks starts elsewhere, nothing hits: 0
        a[32:] + [8],  # the previous prompt cached its one full block: 32
        a[32:] + [8] * 40,  # 78 tokens: the first block hits, the second was never seen whole: 32
    ]
    assert ideal_cached_tokens(prompts) == [0, 64, 32, 0, 32, 32]


def test_one_rebase_cycle_of_the_shipped_policy_by_hand():
    """Window 256, stride 128, horizon 1: histories of 256..383 tokens share the anchor 128, so the prompts grow
    from 128 to 255 tokens. Full-block tokens: 32 prompts each of 128, 160, 192 and 224 = 22528. An unbounded
    cache misses the 128 tokens of the first prompt (a new anchor) and one block at lengths 160, 192 and 224
    (a prompt ending on a block boundary recomputes its last block): 22528 - 224 cached."""
    policy = ContextPolicy(256, 128)
    ids = list(np.random.default_rng(0).integers(4, 1028, 383))
    prompts = [policy.select(ids[:n], 1) for n in range(256, 384)]
    assert [len(prompts[0]), len(prompts[-1])] == [128, 255]
    result = hit_ratios([len(prompt) for prompt in prompts], ideal_cached_tokens(prompts))
    assert result["full_block_tokens"] == 22528
    assert result["cached_tokens"] == 22528 - 224
    assert result["full_block_hit_ratio"] == pytest.approx(0.99006, abs=1e-5)


@pytest.fixture
def naive_server(checkpoint):
    forecaster = Forecaster.from_pretrained(checkpoint)
    server = ForecastServer(("127.0.0.1", 0), make_handler(forecaster, threading.Lock()))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/forecast", forecaster
    server.shutdown()
    server.server_close()


def test_load_level_against_the_naive_server(naive_server):
    url, forecaster = naive_server
    histories = serve.random_histories(3, 80, STRIDE, seed=2)
    bodies = [
        [json.dumps({"prices": prices[: len(prices) - 1 + r].tolist(), "horizon": 1}).encode() for r in range(2)]
        for prices in histories
    ]
    bodies.append([json.dumps({"prices": "not prices"}).encode()])  # a 400, counted as an error
    answers = []
    result = asyncio.run(serve.load_level(url, bodies, answers.append, timeout_s=60))
    assert (result["requests"], result["completed"], result["errors"], result["unfinished"]) == (7, 6, 1, 0)
    assert result["p50_ms"] <= result["p99_ms"]
    local = forecaster.predict(histories[0], horizon=1)
    served = [answer for answer in answers if answer["last_price"] == histories[0][-1]]
    np.testing.assert_allclose(served[0]["probs"], local.distribution.probs, atol=1e-6)


def test_load_level_stops_by_itself():
    """A server that never answers in time: the level ends at its timeout and counts the unfinished requests."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections, never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/forecast"
    try:
        start = time.perf_counter()
        result = asyncio.run(serve.load_level(url, [[b"{}", b"{}"]] * 3, lambda answer: None, timeout_s=0.5))
        assert time.perf_counter() - start < 5
    finally:
        listener.close()
    assert result["completed"] == 0 and result["requests"] == 6
    assert result["errors"] + result["unfinished"] == 6


def test_bench_serve_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args([])
    assert args.json == serve.DEFAULT_JSON and args.symbols == 64 and args.concurrency == (64, 256)
    assert args.sections == list(serve.SECTIONS) and args.stream_bars == 2000
