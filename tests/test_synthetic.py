import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hf_kvtrade import ReturnTokenizer
from hf_kvtrade.data import split_periods, tokenize_period, validate_ohlcv
from hf_kvtrade.synthetic import (
    MODELS,
    SyntheticParams,
    describe,
    generate,
    sample_params,
    simulate,
    synthetic_frames,
)

LONG = 200_001  # prices, so 200,000 returns: sample moments within a few percent


def _simulate(seed=0, length=LONG, **fields):
    return simulate(SyntheticParams(**fields), length, np.random.default_rng(seed))


# ------------------------------------------------------------------------------------ moments match parameters
def test_garch_t_unconditional_variance():
    # omega = 1e-4 * (1 - 0.05 - 0.90) = 5e-6, so omega / (1 - alpha - beta) = 1e-4 (a 1% std per bar).
    params = SyntheticParams("garch", sigma=0.01, nu=8.0, alpha=0.05, beta=0.90)
    assert params.omega == pytest.approx(5e-6)
    series = simulate(params, LONG, np.random.default_rng(1))
    assert np.var(series.returns) == pytest.approx(1e-4, rel=0.08)
    # Volatility clusters: squared returns are autocorrelated. With Gaussian shocks the lag-1 autocorrelation is
    # alpha (1 - alpha beta - beta^2) / (1 - 2 alpha beta - beta^2) = 0.05 * 0.145 / 0.1 = 0.0725; t shocks move it
    # a little.
    squared = series.returns**2
    assert 0.05 < np.corrcoef(squared[:-1], squared[1:])[0, 1] < 0.12


def test_gjr_garch_variance_and_leverage():
    # persistence = 0.03 + 0.90 + 0.08 / 2 = 0.97, omega = 4e-6 * 0.03, so the variance is 4e-6 (std 0.2%).
    params = SyntheticParams("gjr", sigma=2e-3, nu=10.0, alpha=0.03, beta=0.90, gamma=0.08)
    assert params.omega / (1 - params.alpha - params.beta - params.gamma / 2) == pytest.approx(4e-6)
    series = simulate(params, LONG, np.random.default_rng(2))
    assert np.var(series.returns) == pytest.approx(4e-6, rel=0.08)
    # After a fall the next variance takes alpha + gamma = 0.11 of the squared shock, after a rise only alpha = 0.03.
    # Shocks are symmetric with E[e^2 | e < 0] = E[h] = 4e-6, so the next variance is higher after a fall by
    # gamma * 4e-6 = 3.2e-7 on average.
    falls = series.returns[:-1] < 0
    after_fall = np.mean(series.conditional_std[1:][falls] ** 2)
    after_rise = np.mean(series.conditional_std[1:][~falls] ** 2)
    assert after_fall - after_rise == pytest.approx(3.2e-7, rel=0.15)


def test_student_t_innovations_have_the_kurtosis_of_their_degrees_of_freedom():
    # Standardised t with nu = 10: kurtosis 3 + 6 / (10 - 4) = 4; returns over a GARCH variance are fatter still.
    series = _simulate(seed=3, model="garch", sigma=1e-3, nu=10.0, alpha=0.05, beta=0.90)
    z = series.returns / series.conditional_std
    assert np.var(z) == pytest.approx(1.0, rel=0.02)
    assert stats.kurtosis(z, fisher=False) == pytest.approx(4.0, abs=0.35)
    assert stats.kurtosis(series.returns, fisher=False) > stats.kurtosis(z, fisher=False)


def test_stochastic_volatility_mean_variance_and_persistence():
    series = _simulate(seed=4, model="sv", sigma=0.02, nu=np.inf, phi=0.98, vol_of_vol=0.1)
    # E[h] = sigma^2 = 4e-4 by construction of the log-normal mean.
    assert np.mean(series.conditional_std**2) == pytest.approx(4e-4, rel=0.1)
    assert np.var(series.returns) == pytest.approx(4e-4, rel=0.1)
    log_h = np.log(series.conditional_std**2)
    assert np.corrcoef(log_h[:-1], log_h[1:])[0, 1] == pytest.approx(0.98, abs=0.005)
    assert np.std(log_h) == pytest.approx(0.1 / np.sqrt(1 - 0.98**2), rel=0.1)  # 0.503


def test_regime_switches_spend_the_stationary_share_in_each_state():
    # Leave calm with p 0.002 and turbulent with p 0.02: turbulent 0.002 / 0.022 = 1/11 of the time, spells of
    # 1 / 0.02 = 50 bars; a 3x vol ratio; the mix still has variance sigma^2.
    params = SyntheticParams("regime", sigma=1e-3, nu=np.inf, stay_calm=0.998, stay_turbulent=0.98, vol_ratio=3.0)
    series = simulate(params, LONG, np.random.default_rng(5))
    assert params.turbulent_share == pytest.approx(1 / 11)
    assert series.regimes.mean() == pytest.approx(1 / 11, abs=0.02)
    starts = np.flatnonzero(np.diff(series.regimes.astype(int)) == 1)
    assert len(series.regimes) * (1 / 11) / len(starts) == pytest.approx(50, rel=0.25)  # mean turbulent spell
    calm, turbulent = params.regime_stds
    assert turbulent == pytest.approx(3 * calm)
    assert np.var(series.returns) == pytest.approx(1e-6, rel=0.1)
    assert np.std(series.returns[series.regimes == 1]) == pytest.approx(turbulent, rel=0.05)


def test_jumps_arrive_at_their_intensity_and_add_their_variance():
    # 0.01 jumps per bar over 200,000 bars: 2,000 expected, Poisson std 45.
    series = _simulate(seed=6, model="garch", sigma=1e-3, nu=np.inf, alpha=0.05, beta=0.9,
                       jump_intensity=0.01, jump_mean=-2e-3, jump_std=5e-3)  # fmt: skip
    assert abs(series.jumps.sum() - 2000) < 4 * 45
    # Variance 1e-6 + 0.01 * (4e-6 + 25e-6) = 1.29e-6.
    assert np.var(series.returns) == pytest.approx(1.29e-6, rel=0.1)
    jumpy = series.jumps > 0
    assert np.mean(series.returns[jumpy]) == pytest.approx(-2e-3, abs=5e-4)


def test_prices_are_whole_ticks():
    # A tick of 0.05 on a price of 20 is 0.25%, a quarter of the 1% bar std: many bars do not move at all.
    series = _simulate(seed=7, length=5000, model="garch", sigma=0.001, alpha=0.05, beta=0.9, start_price=20.0, tick=0.05)
    closes = series.frame["close"].to_numpy()
    cents = np.round(closes * 100).astype(np.int64)
    assert np.array_equal(cents / 100, closes)  # two decimals exactly, as a quote prints them
    assert np.all(cents % 5 == 0)  # whole ticks of 0.05
    assert closes[0] == 20.0
    moves = np.diff(cents) // 5
    assert (moves == 0).mean() > 0.2 and set(np.unique(np.abs(moves))) <= {0, 1, 2, 3, 4, 5, 6, 7, 8}


# ------------------------------------------------------------------------------------------- drawn parameters
def test_drawn_parameters_cover_the_documented_ranges():
    rng = np.random.default_rng(0)
    drawn = [sample_params(rng) for _ in range(400)]
    sigmas = np.array([p.sigma for p in drawn])
    assert sigmas.min() >= 1e-4 and sigmas.max() <= 5e-2
    assert sigmas.min() < 2e-4 and sigmas.max() > 2.5e-2  # both ends, FX hourly to crypto, are reached
    assert {p.model for p in drawn} == set(MODELS)
    assert all(p.nu > 4 for p in drawn)  # finite kurtosis
    assert all(p.persistence < 1 for p in drawn if p.model in ("garch", "gjr"))
    assert 0.35 < np.mean([p.jump_intensity > 0 for p in drawn]) < 0.65
    for p in drawn:
        mantissa = p.tick / 10 ** np.floor(np.log10(p.tick))
        assert min(abs(mantissa - step) for step in (1, 2, 5)) < 1e-9  # 1, 2 or 5 times a power of ten
        assert p.tick / p.start_price <= max(min(1e-3, p.sigma), 1e-6)


def test_generation_is_deterministic_under_a_seed():
    first, again, other = generate(6, 300, seed=11), generate(6, 300, seed=11), generate(6, 300, seed=12)
    for a, b, c in zip(first, again, other):
        assert a.name == b.name and a.params == b.params
        pd.testing.assert_frame_equal(a.frame, b.frame)
        assert not np.array_equal(a.frame["close"].to_numpy(), c.frame["close"].to_numpy())
    # Series i is the same however many series are asked for.
    pd.testing.assert_frame_equal(generate(2, 300, seed=11)[1].frame, first[1].frame)
    assert list(describe(first)["model"]) == ["garch", "gjr", "sv", "regime", "garch", "gjr"]


def test_frames_are_shaped_like_the_bundled_series_and_tokenize():
    frames = synthetic_frames(4, 1000, seed=3)
    tokenizer = ReturnTokenizer()
    for name, frame in frames.items():
        assert name.startswith("synthetic_")
        assert list(frame.columns) == ["close"] and frame.index.name == "timestamp" and str(frame.index.tz) == "UTC"
        pd.testing.assert_frame_equal(validate_ohlcv(frame), frame)  # nothing to reject or repair
        train, _, _ = split_periods(frame)
        ids = tokenize_period(train, tokenizer)
        assert len(ids) == len(train)  # bos + one token per return
        assert ids[1:].min() >= tokenizer.first_bin_id


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="alpha \\+ beta \\+ gamma/2 < 1"):
        SyntheticParams("gjr", sigma=0.01, alpha=0.1, beta=0.9, gamma=0.1)
    with pytest.raises(ValueError, match="nu must be > 2"):
        SyntheticParams("garch", sigma=0.01, nu=2.0, alpha=0.1, beta=0.8)
    with pytest.raises(ValueError, match="model must be one of"):
        SyntheticParams("arima", sigma=0.01)
    with pytest.raises(ValueError, match="models must be a non-empty subset"):
        generate(1, 10, seed=0, models=("heston",))
