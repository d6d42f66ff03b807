"""The native vLLM model against the Transformers model, on the shipped checkpoint.

One real engine (`vllm.LLM` through `OfflineForecaster`) is started for the whole module: start-up is the cost.
"""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from hf_kvtrade import Forecaster, ReturnTokenizer
from hf_kvtrade.checkpoint import SHIPPED_CHECKPOINT
from hf_kvtrade.data import load_series
from hf_kvtrade.evaluation import model_forecast

pytestmark = pytest.mark.slow

BLOCK_SIZE = 32


def random_prices(length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, length)))


@pytest.fixture(scope="module")
def checkpoint():
    return SHIPPED_CHECKPOINT


@pytest.fixture(scope="module")
def hf_forecaster(checkpoint):
    return Forecaster.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def engine(checkpoint):
    from hf_kvtrade.client import OfflineForecaster

    forecaster = OfflineForecaster(checkpoint, enforce_eager=True, block_size=BLOCK_SIZE)
    yield forecaster
    forecaster.llm.llm_engine.engine_core.shutdown()


def test_register_is_idempotent():
    from transformers import AutoConfig
    from vllm import ModelRegistry

    import vllm_plugin
    from hf_kvtrade import KVTradeConfig

    vllm_plugin.register()
    vllm_plugin.register()
    assert "KVTradeForCausalLM" in ModelRegistry.get_supported_archs()
    assert type(AutoConfig.for_model("kvtrade")) is KVTradeConfig


def test_checkpoint_stops_on_eos_without_a_tokenizer(checkpoint):
    # With skip_tokenizer_init, generation_config.json is vLLM's only source of the eos id.
    generation_config = json.loads((checkpoint / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == ReturnTokenizer.eos_token_id


def test_next_token_logprobs_match_transformers(engine, hf_forecaster):
    from vllm import SamplingParams

    vocab_size = hf_forecaster.tokenizer.vocab_size
    # Several lengths in one batch: prefill of ragged sequences through PagedAttention, across block boundaries.
    prompts = [engine.encode_context(random_prices(length, seed)) for seed, length in enumerate((2, 31, 33, 700))]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=1, logprobs=vocab_size))
    for prompt, output in zip(prompts, outputs):
        logprobs_by_id = output.outputs[0].logprobs[0]
        vllm_logprobs = np.array([logprobs_by_id[token].logprob for token in range(vocab_size)])
        with torch.no_grad():
            logits = hf_forecaster.model(input_ids=torch.tensor([prompt])).logits[0, -1]
        hf_logprobs = torch.log_softmax(logits, dim=-1).numpy()
        np.testing.assert_allclose(vllm_logprobs, hf_logprobs, atol=1e-5, rtol=0)


def test_one_step_forecast_matches_transformers(engine, hf_forecaster):
    prices = random_prices(500, seed=7)
    vllm_forecast = engine.predict(prices, horizon=1)
    hf_forecast = hf_forecaster.predict(prices, horizon=1)
    np.testing.assert_allclose(vllm_forecast.distribution.probs, hf_forecast.distribution.probs, atol=1e-6)
    np.testing.assert_allclose(vllm_forecast.return_quantiles, hf_forecast.return_quantiles, atol=1e-7)
    np.testing.assert_allclose(vllm_forecast.prob_up, hf_forecast.prob_up, atol=1e-6)


def test_engine_runs_at_the_policy_window(engine, hf_forecaster):
    assert engine.llm.llm_engine.model_config.max_model_len == hf_forecaster.context_policy.window


def test_every_bar_past_the_window_matches_the_forecaster(engine, hf_forecaster):
    """Histories of 3 windows + 17 bars of real closes: the forecast of each of the last 2 windows' bars, across
    rebases, equals the Transformers `Forecaster`'s for the same prices."""
    policy = hf_forecaster.context_policy
    prices = load_series("sp500")["close"].to_numpy()[-(3 * policy.window + 17) :]
    first = len(prices) - 2 * policy.window
    histories = [prices[:n] for n in range(first, len(prices))]
    # Forecaster.predict of every history in one batched pass per policy window (equal bar by bar: test_evaluation).
    ids = hf_forecaster.tokenizer.encode(prices)
    expected = model_forecast(hf_forecaster.model, hf_forecaster.tokenizer, ids, first, policy).probs
    forecasts = engine.predict_batch(histories, horizon=1)
    for history, served, probs in zip(histories, forecasts, expected):
        np.testing.assert_allclose(served.distribution.probs, probs, atol=1e-5, err_msg=f"{len(history)} bars")


def test_sampled_paths_agree_in_distribution_with_generate(engine, hf_forecaster):
    """Two-sample tests between vLLM's and `generate`'s paths, both from the full distribution over return bins.

    With 2000 paths each, a real difference of a few percent in bin probabilities would be detected; p-values
    above 1e-3 (fixed seeds, so the test is deterministic) say the samplers agree.
    """
    prices = random_prices(200, seed=3)
    num_samples, horizon = 2000, 4
    vllm_paths = engine.predict(prices, horizon=horizon, num_samples=num_samples, seed=0).paths
    hf_paths = hf_forecaster.predict(prices, horizon=horizon, num_samples=num_samples, seed=0).paths
    assert vllm_paths.shape == hf_paths.shape == (num_samples, horizon)
    assert np.isfinite(vllm_paths).all(), "a sampled step was a special token, not a return bin"

    # First step: a contingency table of the two samplers' counts over the bins drawn at least 10 times in all.
    bins, counts = np.unique(np.concatenate([vllm_paths[:, 0], hf_paths[:, 0]]), return_counts=True)
    frequent = bins[counts >= 10]
    table = np.array(
        [[np.sum(paths[:, 0] == value) for value in frequent] for paths in (vllm_paths, hf_paths)]
    )
    assert table.shape[1] >= 2, "the model is too peaked for a chi-square test"
    assert stats.chi2_contingency(table).pvalue > 1e-3

    # Whole paths: the cumulative return after each step.
    for step in range(horizon):
        vllm_cumulative = vllm_paths[:, : step + 1].sum(axis=1)
        hf_cumulative = hf_paths[:, : step + 1].sum(axis=1)
        assert stats.ks_2samp(vllm_cumulative, hf_cumulative).pvalue > 1e-3


def test_each_new_bar_reuses_the_cached_history(engine):
    """Streaming ticks: one request per new bar. The tokenizer is causal, so each prompt extends the last one
    and every full KV block of the history comes from the prefix cache."""
    from vllm import SamplingParams

    prices = random_prices(400, seed=11)
    previous_prompt = None
    for num_bars in range(300, 300 + 2 * BLOCK_SIZE + 1):
        prompt = engine.encode_context(prices[:num_bars])
        (output,) = engine.generate([prompt], SamplingParams(max_tokens=1))
        if previous_prompt is None:
            assert output.num_cached_tokens == 0
        else:
            assert prompt[: len(previous_prompt)] == previous_prompt
            # vLLM always recomputes at least the last prompt token, so a prompt ending on a block boundary
            # keeps its last block out of the cache.
            expected = min(len(previous_prompt), len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
            assert output.num_cached_tokens == expected
        previous_prompt = prompt
