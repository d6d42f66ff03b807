"""`PromptGuard`'s rule for `/v1/completions` bodies, without a server: `tests/test_vllm_server.py` sends the same
shapes to a real one."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_kvtrade.serving import (
    MAX_REQUEST_TOKENS_ENV,
    MAX_SAMPLES_ENV,
    VLLM_DEFAULT_MAX_TOKENS,
    PromptGuard,
    prompt_problem,
    server_environment,
)

VOCAB_SIZE = 1028
RULE = (
    ": a prompt is a non-empty list of ReturnTokenizer ids in [0, 1028) (0-3 special, then one id per return bin), "
    "or a non-empty list of such lists"
)

PROBLEMS = {
    "text": ("the price goes up", 'prompt is text ("the price goes up"), and this server has no text tokenizer'),
    "text among ids": (["1", 5, 1], 'prompt[0] is text ("1"), and this server has no text tokenizer'),
    "text before a huge id": (["1", 10**30, 1], 'prompt[0] is text ("1"), and this server has no text tokenizer'),
    "text in a batch": ([[1, 5], "7"], 'prompt[1] is text ("7"), and this server has no text tokenizer'),
    "long text, cut short": (["x" * 100], f'prompt[0] is text ("{"x" * 36}...), and this server has no text tokenizer'),
    "huge id": ([1, 10**30], "prompt[1] is token id 1000000000000000000000000000000, outside this model's vocabulary"),
    "first id past the vocabulary": ([VOCAB_SIZE], "prompt[0] is token id 1028, outside this model's vocabulary"),
    "negative id": ([[1], [2, -1]], "prompt[1][1] is token id -1, outside this model's vocabulary"),
    "float": ([1, 1.0], "prompt[1] is the float 1.0, not a token id"),
    "boolean": ([1, True], "prompt[1] is the boolean true, not a token id"),
    "null id": ([None], "prompt[0] is null, not a token id"),
    "object id": ([[1, {"id": 5}]], "prompt[0][1] is a JSON object, not a token id"),
    "null prompt": (None, "prompt is null, not a list of token ids"),
    "object prompt": ({"ids": [1]}, "prompt is a JSON object, not a list of token ids"),
    "bare id": (5, "prompt is token id 5, not a list of token ids"),
    "empty": ([], "prompt is an empty list"),
    "empty in a batch": ([[1], []], "prompt[1] is an empty list"),
    "list among ids": ([1, [2]], "prompt[1] is a list among token ids, and ids and lists do not mix at one level"),
    "id among lists": ([[1], 2], "prompt[1] is token id 2, not a list of token ids like prompt[0]"),
    "too deep": ([[1, 2], [3, 4, [5]]], "prompt[1][2] is a list, nested deeper than a batch of lists of token ids"),
}


@pytest.mark.parametrize("prompt, problem", PROBLEMS.values(), ids=PROBLEMS.keys())
def test_each_malformed_prompt_is_named_with_where_it_is(prompt, problem):
    assert prompt_problem(prompt, VOCAB_SIZE) == problem + RULE


@pytest.mark.parametrize("prompt", [[0], [1, 520, VOCAB_SIZE - 1], [[1, 2], [3]]], ids=["id 0", "ids", "batch"])
def test_token_ids_pass(prompt):
    assert prompt_problem(prompt, VOCAB_SIZE) is None


@pytest.fixture
def guard(monkeypatch):
    monkeypatch.setenv(MAX_SAMPLES_ENV, "64")
    monkeypatch.setenv(MAX_REQUEST_TOKENS_ENV, "1000")
    return PromptGuard(app=None)


BODIES_FOR_VLLM = {
    "truncated JSON": b'{"prompt": [1, 2',
    "integer too long to parse": b'{"prompt": [1, ' + b"9" * 5000 + b"]}",
    "nesting too deep to parse": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "no prompt": b'{"max_tokens": 1}',
    "not an object": b'"not a request"',
}


@pytest.mark.parametrize("body", BODIES_FOR_VLLM.values(), ids=BODIES_FOR_VLLM.keys())
def test_bodies_vllm_refuses_itself_pass_the_guard(guard, body):
    assert guard.find_problem(body, VOCAB_SIZE) is None


def test_the_guard_names_the_parameter(guard):
    assert guard.find_problem(b'{"prompt": [1, 2], "n": 65}', VOCAB_SIZE)[1] == "n"
    text_among_ids = prompt_problem(["1", 5, 1], VOCAB_SIZE)
    assert guard.find_problem(b'{"prompt": ["1", 5, 1]}', VOCAB_SIZE) == (text_among_ids, "prompt")
    assert guard.find_problem(b'{"prompt": null}', VOCAB_SIZE)[1] == "prompt"


WORK_OVER_THE_BUDGET = {
    "many samples": (
        b'{"prompt": [1, 2, 3], "n": 50, "max_tokens": 18}',
        "n x (prompt tokens + max_tokens) = 50 x (3 + 18) = 1050 tokens, above this server's limit of 1000 tokens",
    ),
    "a batch": (
        b'{"prompt": [[1, 2], [3]], "n": 40, "max_tokens": 12}',
        "= 40 x (2 + 12) + (1 + 12) = 1080 tokens",
    ),
    "vLLM's default max_tokens": (b'{"prompt": [1], "n": 64}', "= 64 x (1 + 16) = 1088 tokens"),
    "null max_tokens is vLLM's default": (b'{"prompt": [1], "n": 64, "max_tokens": null}', "= 64 x (1 + 16) = 1088"),
    "long generation": (b'{"prompt": [1], "max_tokens": 1000}', "= 1 x (1 + 1000) = 1001 tokens"),
}


@pytest.mark.parametrize("body, message", WORK_OVER_THE_BUDGET.values(), ids=WORK_OVER_THE_BUDGET.keys())
def test_work_over_the_budget_is_refused_naming_the_limit(guard, body, message):
    problem, parameter = guard.find_problem(body, VOCAB_SIZE)
    assert message in problem and "kvtrade serve --max-request-tokens" in problem and parameter == "n"


def test_work_up_to_the_budget_passes(guard):
    assert guard.find_problem(b'{"prompt": [1, 2, 3, 4], "n": 40, "max_tokens": 21}', VOCAB_SIZE) is None
    # Negative or zero values are vLLM's to refuse, with its own message.
    assert guard.find_problem(b'{"prompt": [1], "n": 10, "max_tokens": -5}', VOCAB_SIZE) is None
    assert guard.find_problem(b'{"prompt": [1], "n": -3, "max_tokens": 5000}', VOCAB_SIZE) is None


NOT_INTEGERS = {
    "float n": (b'{"prompt": [1], "n": 5000.0}', "n is the float 5000.0, not an integer", "n"),
    "text n": (b'{"prompt": [1], "n": "5000"}', 'n is text ("5000"), not an integer', "n"),
    "boolean n": (b'{"prompt": [1], "n": true}', "n is the boolean true, not an integer", "n"),
    "list max_tokens": (b'{"prompt": [1], "max_tokens": [8]}', "max_tokens is a list, not an integer", "max_tokens"),
    "float max_tokens": (b'{"prompt": [1], "max_tokens": 1e9}', "max_tokens is the float 1000000000.0, not an integer", "max_tokens"),
}


@pytest.mark.parametrize("body, message, parameter", NOT_INTEGERS.values(), ids=NOT_INTEGERS.keys())
def test_n_and_max_tokens_must_be_integers_or_vllm_would_coerce_them_past_the_caps(guard, body, message, parameter):
    assert guard.find_problem(body, VOCAB_SIZE) == (message, parameter)


def test_the_default_max_tokens_is_vllms():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    assert CompletionRequest.model_fields["max_tokens"].default == VLLM_DEFAULT_MAX_TOKENS


def test_server_environment_carries_the_caps():
    environment = server_environment(max_samples=8, max_request_tokens=4096)
    assert environment[MAX_SAMPLES_ENV] == "8" and environment[MAX_REQUEST_TOKENS_ENV] == "4096"
    with pytest.raises(ValueError, match="max_request_tokens must be at least 1, got 0"):
        server_environment(max_request_tokens=0)


token_ids = st.integers(0, VOCAB_SIZE - 1)
json_values = st.recursive(
    st.one_of(
        token_ids, st.integers(), st.sampled_from([-1, VOCAB_SIZE, 2**63, 10**30]),
        st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.text(max_size=5), st.none(),
    ),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=2),
    max_leaves=12,
)  # fmt: skip
prompts = st.one_of(
    st.lists(token_ids, min_size=1, max_size=8),
    st.lists(st.lists(token_ids, min_size=1, max_size=8), min_size=1, max_size=4),
    json_values,
)


def _is_id(value) -> bool:
    return type(value) is int and 0 <= value < VOCAB_SIZE


def _is_ids(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_is_id(token) for token in value)


@settings(max_examples=300, deadline=None)
@given(prompts)
def test_only_token_ids_pass_and_the_named_place_exists(prompt):
    problem = prompt_problem(prompt, VOCAB_SIZE)
    valid = _is_ids(prompt) or (isinstance(prompt, list) and len(prompt) > 0 and all(_is_ids(ids) for ids in prompt))
    assert (problem is None) == valid
    if problem is not None:
        where = re.match(r"prompt((?:\[\d+\])*) is ", problem)
        assert where is not None, problem
        value = prompt
        for index in re.findall(r"\d+", where.group(1)):
            value = value[int(index)]
