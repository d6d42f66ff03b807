"""The context policy: one rule from a history length to the tokens conditioned on, checked on its own terms."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hf_kvtrade.context import ContextPolicy

policies = st.integers(2, 300).flatmap(lambda window: st.builds(ContextPolicy, st.just(window), st.integers(1, window - 1)))


def test_a_hand_worked_example():
    policy = ContextPolicy(window=8, stride=4)
    # Histories of 1..7 tokens fit with the forecast bar; then the anchor jumps by 4 every 4 bars.
    assert [policy.start(n) for n in range(1, 16)] == [0] * 7 + [4] * 4 + [8] * 4
    assert policy.select(list(range(12))) == [8, 9, 10, 11]
    # A 3-bar forecast needs room for 3 tokens: the anchor moves earlier.
    assert [policy.start(n, horizon=3) for n in range(1, 10)] == [0] * 5 + [4] * 4
    assert policy.scoring_windows(15) == [(0, 8, 1), (4, 12, 8), (8, 15, 12)]


@given(policies, st.integers(1, 5000), st.integers(1, 300))
def test_context_and_forecast_fit_the_window_and_never_come_up_empty(policy, num_tokens, horizon):
    if horizon > policy.max_horizon:
        with pytest.raises(ValueError, match="horizon"):
            policy.start(num_tokens, horizon)
        return
    start = policy.start(num_tokens, horizon)
    context = num_tokens - start
    assert 1 <= context and context + horizon <= policy.window
    assert start % policy.stride == 0
    # Once the history outgrows the window, the context never drops below window - stride - horizon + 1.
    if start > 0:
        assert context >= policy.window - policy.stride - horizon + 1


@given(policies, st.integers(1, 5000))
def test_between_rebases_each_context_extends_the_previous_one(policy, num_tokens):
    ids = list(range(num_tokens + 1))
    before, after = policy.select(ids[:num_tokens]), policy.select(ids)
    if policy.start(num_tokens) == policy.start(num_tokens + 1):
        assert after[:-1] == before
    else:
        # A rebase: the anchor moves by exactly one stride.
        assert policy.start(num_tokens + 1) - policy.start(num_tokens) == policy.stride


@given(policies, st.integers(2, 3000), st.data())
def test_scoring_windows_score_each_target_once_with_its_serving_context(policy, num_tokens, data):
    first_target = data.draw(st.integers(1, num_tokens - 1))
    scored = []
    for start, end, first_scored in policy.scoring_windows(num_tokens, first_target):
        assert end - start <= policy.window
        for target in range(first_scored, end):
            assert policy.start(target) == start  # the forecast of `target` reads ids[start:target]
            scored.append(target)
    assert scored == list(range(first_target, num_tokens))


def test_the_checkpoint_config_carries_the_policy(tmp_path):
    assert ContextPolicy.from_config({"training_context_length": 256, "context_stride": 64}) == ContextPolicy(256, 64)
    # Without a stride the anchor moves half a window; an untrained config may use every position it has.
    assert ContextPolicy.from_config({"training_context_length": 256}) == ContextPolicy(256, 128)
    assert ContextPolicy.from_config({"max_position_embeddings": 2048}) == ContextPolicy(2048, 1024)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ContextPolicy.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "window, stride, shift, message",
    [(1, 1, 0, "at least 2"), (8, 8, 0, "stride"), (8, 0, 0, "stride"), (16, 8, 8, "shorter prefix")],
)
def test_bad_policies_are_refused(window, stride, shift, message):
    with pytest.raises(ValueError, match=message):
        ContextPolicy(window, stride).shifted(shift)
