"""`kvtrade serve` end to end: a real vLLM server on 127.0.0.1, called with the `openai` client.

The server is started once for the module through the `kvtrade serve` command itself. Every bad request must get a
4xx naming what was wrong, and the request after it must still succeed: on the CPU engine one bad token id
used to kill the server.
"""

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_kvtrade import Forecaster
from hf_kvtrade.checkpoint import SHIPPED_CHECKPOINT
from hf_kvtrade.data import load_series
from hf_kvtrade.evaluation import model_forecast
from hf_kvtrade.serving import prompt_problem
from hf_kvtrade.tokenization_kvtrade import ReturnTokenizer

pytestmark = pytest.mark.slow

API_KEY = "test-key"
MODEL = SHIPPED_CHECKPOINT.name
MAX_SAMPLES = 64
# Small enough that the over-budget cases stay cheap; the client splits larger batches to fit it.
MAX_REQUEST_TOKENS = 16384
VOCAB_SIZE = ReturnTokenizer.from_pretrained(SHIPPED_CHECKPOINT).vocab_size
STARTUP_TIMEOUT_S = 600


def random_prices(length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, length)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint():
    return SHIPPED_CHECKPOINT


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable, "-m", "hf_kvtrade.cli", "serve", str(checkpoint),
        "--port", str(port), "--api-key", API_KEY, "--max-samples", str(MAX_SAMPLES),
        "--max-request-tokens", str(MAX_REQUEST_TOKENS), "--enforce-eager",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _is_healthy(base_url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(1.0)
    yield {"base_url": base_url, "process": process, "log_path": log_path}
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _is_healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def client(server, checkpoint):
    from hf_kvtrade.client import ForecastClient

    return ForecastClient(f"{server['base_url']}/v1", checkpoint, api_key=API_KEY, max_request_tokens=MAX_REQUEST_TOKENS)


@pytest.fixture
def assert_still_serving(server, client):
    """Runs after each bad-input test: the server is alive and answers a valid request."""
    yield
    assert server["process"].poll() is None, "the server died"
    forecast = client.predict(random_prices(64, seed=0), horizon=1)
    assert forecast.distribution.probs.shape == (client.tokenizer.num_bins,)


def test_serve_prints_how_to_call_it(server):
    printed = server["log_path"].read_text()
    assert f"{server['base_url']}/v1/completions" in printed
    assert "ForecastClient(" in printed


def test_one_step_forecast_matches_transformers(client, checkpoint):
    prices = random_prices(300, seed=1)
    served = client.predict(prices, horizon=1)
    local = Forecaster.from_pretrained(checkpoint).predict(prices, horizon=1)
    np.testing.assert_allclose(served.distribution.probs, local.distribution.probs, atol=1e-6)
    np.testing.assert_allclose(served.return_quantiles, local.return_quantiles, atol=1e-7)


def test_every_bar_past_the_window_matches_the_forecaster(client, checkpoint):
    """2 windows + 17 bars of real closes; each bar of the last window, across two rebases, through the server."""
    local = Forecaster.from_pretrained(checkpoint)
    policy = local.context_policy
    prices = load_series("sp500")["close"].to_numpy()[-(2 * policy.window + 17) :]
    first = len(prices) - policy.window
    histories = [prices[:n] for n in range(first, len(prices))]
    assert len({policy.start(len(history)) for history in histories}) >= 3  # the stretch crosses two rebases
    # Forecaster.predict of every history in one batched pass per policy window (equal bar by bar: test_evaluation).
    ids = local.tokenizer.encode(prices)
    expected = model_forecast(local.model, local.tokenizer, ids, first, policy).probs
    # Batches of 64 contexts are over the server's token budget: the client splits them.
    for start in range(0, len(histories), 64):
        batch = histories[start : start + 64]
        for history, served, probs in zip(batch, client.predict_batch(batch, horizon=1), expected[start : start + 64]):
            np.testing.assert_allclose(served.distribution.probs, probs, atol=1e-5, err_msg=f"{len(history)} bars")


def test_a_client_for_another_window_is_refused(server, tmp_path):
    import json
    import shutil

    from hf_kvtrade.client import ForecastClient

    other = tmp_path / "other"
    shutil.copytree(SHIPPED_CHECKPOINT, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "training_context_length": 512, "context_stride": 256}))
    with pytest.raises(ValueError, match=f"max_model_len {config['training_context_length']}.*512-token window"):
        ForecastClient(f"{server['base_url']}/v1", other, api_key=API_KEY)


def test_sampled_forecasts_for_a_batch_of_series(client):
    series = [random_prices(100, seed=2), random_prices(250, seed=3)]
    forecasts = client.predict_batch(series, horizon=5, num_samples=32, seed=0)
    for prices, forecast in zip(series, forecasts):
        assert forecast.paths.shape == (32, 5)
        assert np.isfinite(forecast.paths).all(), "a sampled step was a special token, not a return bin"
        assert forecast.last_price == prices[-1]
        assert np.all(np.diff(forecast.return_quantiles, axis=1) >= 0)


def test_seeded_samples_of_long_histories_keep_the_server_alive(client, assert_still_serving):
    """vLLM rewinds the generator of a seeded request prefilled in part, which the CPU engine cannot do: the
    server prefills prompts whole so that a seed and long prompts never meet a partial prefill."""
    series = [random_prices(1900, seed=20 + index) for index in range(3)]
    first = client.predict_batch(series, horizon=4, num_samples=8, seed=123)
    second = client.predict_batch(series, horizon=4, num_samples=8, seed=123)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.paths, b.paths)


def test_samples_over_the_budget_are_split_into_seeded_requests(client):
    prices = random_prices(1500, seed=30)
    # A 988-token context: 16384 // (988 + 4) = 16 samples per request, so 40 go out as 16 + 16 + 8 (seeds 7, 8, 9).
    first, second = (client.predict(prices, horizon=4, num_samples=40, seed=7) for _ in range(2))
    assert first.paths.shape == (40, 4) and np.isfinite(first.paths).all()
    np.testing.assert_array_equal(first.paths, second.paths)
    assert not np.array_equal(first.paths[:16], first.paths[16:32]), "each request must draw its own samples"


def test_logprobs_of_the_top_tokens(client):
    prompt = client.encode_context(random_prices(50, seed=4))
    response = client.complete([prompt], max_tokens=3, logprobs=5, n=2)
    assert len(response.choices) == 2
    for choice in response.choices:
        assert len(choice.token_ids) == 3
        for top in choice.logprobs.top_logprobs:
            assert 5 <= len(top) <= 6  # the top 5, plus the sampled token when it is not among them
            assert all(key.startswith("token_id:") and value <= 0 for key, value in top.items())


def test_new_bar_hits_the_prefix_cache(client):
    prices = random_prices(200, seed=5)
    first = client.complete([client.encode_context(prices[:-1])], max_tokens=1)
    second = client.complete([client.encode_context(prices)], max_tokens=1)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # 199 cached history tokens: every full 32-token block of it.
    assert second.usage.prompt_tokens_details.cached_tokens == 199 // 32 * 32


BAD_REQUESTS = {
    "prompt longer than the context": ({"prompt": [1] + [500] * 1100}, "maximum context length is 1024"),
    "absurd n": ({"prompt": [1, 500], "n": 10**9}, f"limit of {MAX_SAMPLES} samples"),
    "zero n": ({"prompt": [1, 500], "n": 0}, "n must be at least 1"),
    "absurd max_tokens": ({"prompt": [1, 500], "max_tokens": 10**12}, f"limit of {MAX_REQUEST_TOKENS} tokens per request"),
    "max_tokens past the context": ({"prompt": [1, 500], "max_tokens": 2000}, "cannot be greater than max_model_len"),
    "work over the budget": (
        {"prompt": [1, 500], "n": 64, "max_tokens": 255},
        (
            f"n x (prompt tokens + max_tokens) = 64 x (2 + 255) = 16448 tokens, above this server's limit of "
            f"{MAX_REQUEST_TOKENS} tokens per request (kvtrade serve --max-request-tokens)"
        ),
    ),
    "a batch over the budget": ({"prompt": [[1, 500]] * 160, "max_tokens": 101}, "= 16480 tokens, above"),
    "n as a float": ({"prompt": [1, 500], "n": 4096.0}, "n is the float 4096.0, not an integer"),
    "n as text": ({"prompt": [1, 500], "n": "4096"}, 'n is text ("4096"), not an integer'),
    "max_tokens as text": ({"prompt": [1, 500], "max_tokens": "8"}, 'max_tokens is text ("8"), not an integer'),
    "negative max_tokens": ({"prompt": [1, 500], "max_tokens": -5}, "max_tokens must be at least 1"),
    "too many logprobs": ({"prompt": [1, 500], "logprobs": 100_000}, "greater than max allowed"),
}


@pytest.mark.parametrize("body, message", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_gets_400_and_server_keeps_serving(client, assert_still_serving, body, message):
    body = {"max_tokens": 1, **body}
    with pytest.raises(openai.BadRequestError) as error:
        client.openai.completions.create(model=client.model, **body)
    assert error.value.status_code == 400
    assert message in error.value.message


MALFORMED_PROMPTS = {
    "text": ("the price goes up", 'prompt is text ("the price goes up"), and this server has no text tokenizer'),
    "empty text": ("", 'prompt is text (""), and this server has no text tokenizer'),
    "text among ids": (["1", 5, 1], 'prompt[0] is text ("1"), and this server has no text tokenizer'),
    "text before a huge id": (["1", 10**30, 1], 'prompt[0] is text ("1")'),
    "texts": (["up", "down"], 'prompt[0] is text ("up")'),
    "text in a batch": ([[1, 5], ["7"]], 'prompt[1][0] is text ("7")'),
    "id above the vocabulary": ([1, 4, 100_000], "prompt[2] is token id 100000, outside this model's vocabulary"),
    "id past int64": ([1, 2**64], f"prompt[1] is token id {2**64}, outside"),
    "negative id": ([1, -1], "prompt[1] is token id -1, outside"),
    "bad id in a batch": ([[1, 5], [1, 1_000_000]], "prompt[1][1] is token id 1000000, outside"),
    "float": ([1, 4.5], "prompt[1] is the float 4.5, not a token id"),
    "whole float": ([1, 1.0], "prompt[1] is the float 1.0, not a token id"),
    "boolean": ([1, True], "prompt[1] is the boolean true, not a token id"),
    "null id": ([1, None], "prompt[1] is null, not a token id"),
    "object id": ([1, {"id": 5}], "prompt[1] is a JSON object, not a token id"),
    "null prompt": (None, "prompt is null, not a list of token ids"),
    "object prompt": ({"ids": [1, 5]}, "prompt is a JSON object, not a list of token ids"),
    "bare id": (5, "prompt is token id 5, not a list of token ids"),
    "empty": ([], "prompt is an empty list"),
    "empty in a batch": ([[1, 5], []], "prompt[1] is an empty list"),
    "list among ids": ([1, [5]], "prompt[1] is a list among token ids, and ids and lists do not mix at one level"),
    "id among lists": ([[1, 5], 7], "prompt[1] is token id 7, not a list of token ids like prompt[0]"),
    "too deep": ([[1, 5], [1, 4, [5]]], "prompt[1][2] is a list, nested deeper than a batch of lists of token ids"),
}


def post_completion(server, body: dict) -> httpx.Response:
    return httpx.post(
        f"{server['base_url']}/v1/completions",
        json={"model": MODEL, "max_tokens": 1, **body},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )


@pytest.mark.parametrize("prompt, message", MALFORMED_PROMPTS.values(), ids=MALFORMED_PROMPTS.keys())
def test_malformed_prompt_gets_400_naming_it(server, assert_still_serving, prompt, message):
    response = post_completion(server, {"prompt": prompt})
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"]
    assert f"a prompt is a non-empty list of ReturnTokenizer ids in [0, {VOCAB_SIZE})" in error["message"]
    assert error["param"] == "prompt"


token_ids = st.integers(0, VOCAB_SIZE - 1)
json_values = st.recursive(
    st.one_of(
        token_ids, st.integers(), st.sampled_from([-1, VOCAB_SIZE, 2**63, 2**64, 10**30]),
        st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.text(max_size=5), st.none(),
    ),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=2),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.lists(token_ids, min_size=1, max_size=8),
        st.lists(st.lists(token_ids, min_size=1, max_size=8), min_size=1, max_size=4),
        json_values,
    )
)
def test_any_json_prompt_gets_an_answer_not_a_server_error(server, assert_still_serving, prompt):
    response = post_completion(server, {"prompt": prompt})
    problem = prompt_problem(prompt, VOCAB_SIZE)
    assert response.status_code == (200 if problem is None else 400), response.text
    if problem is not None:
        assert problem in response.json()["error"]["message"]
    assert server["process"].poll() is None, "the server died"


def test_work_at_the_budget_is_served(client, server):
    response = post_completion(server, {"prompt": [1, 500], "n": 64, "max_tokens": 254})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 64


small_counts = st.integers(-2, 80) | json_values
request_fields = {
    "model": st.just(MODEL) | st.text(max_size=5),
    "prompt": st.lists(token_ids, min_size=1, max_size=8) | json_values,
    "n": small_counts,
    "max_tokens": st.integers(-2, 3000) | json_values,
    "logprobs": st.integers(-2, 2 * VOCAB_SIZE) | json_values,
    "temperature": st.floats(allow_nan=False, allow_infinity=False) | json_values,
}
request_bodies = st.fixed_dictionaries({}, optional=request_fields) | json_values


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_bodies)
def test_any_json_body_gets_an_answer_not_a_server_error(server, assert_still_serving, body):
    """Random bodies, valid or not, with the fields the guard and vLLM check: never a 5xx, never a dead server."""
    response = httpx.post(
        f"{server['base_url']}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    )
    assert response.status_code < 500, response.text
    assert server["process"].poll() is None, "the server died"


BODIES_FOR_VLLM = {
    "truncated JSON": (b'{"prompt": [1, 2', "JSON decode error"),
    "integer too long to parse": (b'{"prompt": [1, ' + b"9" * 5000 + b"]}", "error parsing the body"),
    "nesting too deep to parse": (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "error parsing the body"),
    "no prompt": (b'{"model": "' + MODEL.encode() + b'", "max_tokens": 1}', "Either prompt or prompt_embeds"),
}


@pytest.mark.parametrize("body, message", BODIES_FOR_VLLM.values(), ids=BODIES_FOR_VLLM.keys())
def test_bodies_the_guard_leaves_to_vllm_get_400(server, assert_still_serving, body, message):
    response = httpx.post(
        f"{server['base_url']}/v1/completions",
        content=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    assert message in json.dumps(response.json())


@pytest.mark.parametrize("api_key", ["wrong-key", None], ids=["wrong key", "no key"])
def test_wrong_api_key_gets_401(server, assert_still_serving, api_key):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.post(
        f"{server['base_url']}/v1/completions",
        json={"model": MODEL, "prompt": [1, 500], "max_tokens": 1},
        headers=headers,
        timeout=30,
    )
    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized"}


def test_fairness_scenario_of_bench_serve(server, assert_still_serving):
    """The `fairness` section of `kvtrade bench serve`, at small settings, against this module's server."""
    import argparse
    import asyncio

    from hf_kvtrade.benchmarks import _fairness

    parser = argparse.ArgumentParser()
    _fairness.add_arguments(parser)
    args = parser.parse_args(["--fairness-light-requests", "4", "--fairness-heavy-prompt", "32", "--fairness-heavy-steps", "16"])
    tokenizer = ReturnTokenizer.from_pretrained(SHIPPED_CHECKPOINT)
    result = asyncio.run(
        _fairness.measure(
            f"{server['base_url']}/v1/completions", MODEL, tokenizer, MAX_REQUEST_TOKENS, MAX_SAMPLES, args,
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    )  # fmt: skip
    heavy = result["heavy"]
    assert heavy["n"] == MAX_SAMPLES and heavy["work_tokens"] == MAX_SAMPLES * (32 + 16) <= MAX_REQUEST_TOKENS
    assert result["over_budget"]["work_tokens"] > MAX_REQUEST_TOKENS and result["over_budget"]["status"] == 400
    assert f"limit of {MAX_REQUEST_TOKENS} tokens per request" in result["over_budget"]["message"]
    assert result["light"]["loaded_p99_ms"] >= result["light"]["loaded_p50_ms"] > 0
    assert result["target"]["met"] == (result["light"]["loaded_p99_ms"] < 1000.0)
    assert len(_fairness.report(result, "this machine")) == 3
