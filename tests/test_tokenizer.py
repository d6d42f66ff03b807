import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_kvtrade import Forecaster, KVTradeConfig, ReturnTokenizer

positive_prices = st.lists(
    st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=200
)


@pytest.mark.filterwarnings("ignore:.*beyond the clip range")
@given(prices=positive_prices, cut=st.integers(min_value=1, max_value=200))
@settings(max_examples=200, deadline=None)
def test_encoding_a_prefix_gives_a_prefix_of_the_encoding(prices, cut):
    tokenizer = ReturnTokenizer()
    cut = min(cut, len(prices))
    with np.errstate(all="ignore"):
        full = tokenizer.encode(prices)
        head = tokenizer.encode(prices[:cut])
    np.testing.assert_array_equal(head, full[:cut])


@pytest.mark.filterwarnings("ignore:.*beyond the clip range")
@given(
    prices=st.lists(st.floats(min_value=1.0, max_value=1e4), min_size=2, max_size=50),
    nan_at=st.integers(min_value=1, max_value=49),
)
@settings(max_examples=100, deadline=None)
def test_missing_bars_keep_the_prefix_property(prices, nan_at):
    tokenizer = ReturnTokenizer()
    prices = np.array(prices)
    prices[min(nan_at, len(prices) - 1)] = np.nan
    full = tokenizer.encode(prices, missing="token")
    for cut in range(1, len(prices) + 1):
        np.testing.assert_array_equal(tokenizer.encode(prices[:cut], missing="token"), full[:cut])


def test_one_id_per_price_starting_with_bos():
    tokenizer = ReturnTokenizer()
    ids = tokenizer.encode([100.0, 101.0, 99.0])
    assert len(ids) == 3
    assert ids[0] == tokenizer.bos_token_id
    assert np.all(ids[1:] >= tokenizer.first_bin_id)


@pytest.mark.parametrize("num_bins,clip", [(1024, 0.2), (256, 0.05), (4096, 0.5)])
def test_round_trip_error_is_at_most_half_a_bin_width(num_bins, clip):
    tokenizer = ReturnTokenizer(num_bins=num_bins, clip=clip)
    returns = np.random.default_rng(0).uniform(-clip, clip, 20_000)
    ids = tokenizer.encode_returns(returns)
    decoded = tokenizer.decode(ids)
    widths = tokenizer.bin_widths[ids - tokenizer.first_bin_id]
    assert np.all(np.abs(decoded - returns) <= widths / 2 + 1e-12)


def test_bins_are_monotone_and_finest_at_zero():
    tokenizer = ReturnTokenizer()
    assert np.all(np.diff(tokenizer.bin_edges) > 0)
    assert tokenizer.bin_edges[0] == pytest.approx(-tokenizer.clip)
    assert tokenizer.bin_edges[-1] == pytest.approx(tokenizer.clip)
    assert np.argmin(tokenizer.bin_widths) in (tokenizer.num_bins // 2 - 1, tokenizer.num_bins // 2)
    # Positive returns land strictly above the middle edge, so P(up) is a sum over whole bins.
    assert tokenizer.bin_edges[tokenizer.num_bins // 2] == pytest.approx(0.0, abs=1e-15)


def test_clipped_returns_are_reported():
    tokenizer = ReturnTokenizer(clip=0.1)
    with pytest.warns(UserWarning, match="beyond the clip range"):
        encoding = tokenizer.encode_with_info([100.0, 100.0, 50.0, 51.0])
    np.testing.assert_array_equal(encoding.clipped_indices, [2])
    assert encoding.ids[2] == tokenizer.first_bin_id  # the lowest bin


@pytest.mark.parametrize(
    "prices,message",
    [
        ([], "empty"),
        ([100.0, -1.0], "index 1"),
        ([100.0, 0.0], "index 1"),
        ([100.0, 101.0, np.inf], "index 2"),
        ([100.0, np.nan, 101.0], "index 1 is NaN"),
        ([np.nan, 100.0], "index 0"),
        ([[100.0, 101.0]], "one-dimensional"),
    ],
)
def test_bad_prices_raise_naming_the_index(prices, message):
    with pytest.raises(ValueError, match=message):
        ReturnTokenizer().encode(prices)


def test_unsorted_timestamps_raise_naming_the_index():
    stamps = np.array(["2024-01-01", "2024-01-03", "2024-01-02"], dtype="datetime64[D]")
    with pytest.raises(ValueError, match="timestamp at index 2"):
        ReturnTokenizer().encode([1.0, 2.0, 3.0], timestamps=stamps)
    with pytest.raises(ValueError, match="3 prices"):
        ReturnTokenizer().encode([1.0, 2.0, 3.0], timestamps=stamps[:2])


def test_nan_bars_map_to_the_missing_token_by_option():
    tokenizer = ReturnTokenizer()
    ids = tokenizer.encode([100.0, np.nan, 110.0], missing="token")
    assert ids[1] == tokenizer.missing_token_id
    # The bar after a gap is measured against the last valid price.
    assert tokenizer.decode(ids[2:])[0] == pytest.approx(np.log(1.1), abs=tokenizer.bin_widths.max())


def test_decode_rejects_out_of_vocabulary_ids():
    tokenizer = ReturnTokenizer()
    with pytest.raises(ValueError, match="outside"):
        tokenizer.decode([5, tokenizer.vocab_size])


def test_a_saved_config_is_the_tokenizers_one_source(tmp_path):
    KVTradeConfig(num_bins=512, return_clip=0.1, mu_law=100.0).save_pretrained(tmp_path)
    assert ReturnTokenizer.from_pretrained(tmp_path) == ReturnTokenizer(num_bins=512, clip=0.1, mu=100.0)


def test_corrupt_or_missing_config_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        ReturnTokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ReturnTokenizer.from_pretrained(tmp_path)


def test_default_config_and_default_tokenizer_share_a_vocabulary():
    config, tokenizer = KVTradeConfig(), ReturnTokenizer()
    assert config.vocab_size == tokenizer.vocab_size
    assert ReturnTokenizer.from_config(config) == tokenizer


def test_a_forecaster_refuses_a_tokenizer_other_than_its_configs(make_tiny_model):
    with pytest.raises(ValueError, match="bin grid"):
        Forecaster(make_tiny_model(), ReturnTokenizer(clip=0.1))
