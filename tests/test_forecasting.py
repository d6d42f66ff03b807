import numpy as np
import pytest
import torch
from scipy import integrate

from hf_kvtrade import BinnedDistribution, Forecast, Forecaster, ReturnTokenizer


@pytest.fixture
def forecaster(make_tiny_model):
    return Forecaster(make_tiny_model())


def test_horizon_one_is_the_softmax_of_the_model_logits(forecaster, random_walk_prices):
    forecast = forecaster.predict(random_walk_prices)
    input_ids = torch.as_tensor(forecaster.tokenizer.encode(random_walk_prices)).unsqueeze(0)
    with torch.no_grad():
        probs = torch.softmax(forecaster.model(input_ids).logits[0, -1], -1).numpy()
    bins = probs[forecaster.tokenizer.first_bin_id :]
    np.testing.assert_allclose(forecast.distribution.probs, bins / bins.sum(), rtol=1e-5, atol=1e-9)
    # The grid is symmetric with a bin edge at zero: "up" is the mass of the upper half of the bins.
    up_mass = bins[forecaster.tokenizer.num_bins // 2 :].sum() / bins.sum()
    assert forecast.prob_up[0] == pytest.approx(up_mass, rel=1e-6)


def test_quantiles_are_monotone_in_returns_and_prices(forecaster, random_walk_prices):
    levels = np.linspace(0.01, 0.99, 25)
    for forecast in (
        forecaster.predict(random_walk_prices, quantiles=levels),
        forecaster.predict(random_walk_prices, horizon=4, num_samples=64, quantiles=levels, seed=1),
    ):
        assert np.all(np.diff(forecast.return_quantiles, axis=-1) >= 0)
        assert np.all(np.diff(forecast.price_quantiles, axis=-1) >= 0)
        assert forecast.price_quantiles.shape == (forecast.horizon, len(levels))


def test_sampled_paths_are_returns_with_the_requested_shape(forecaster, random_walk_prices):
    forecast = forecaster.predict(random_walk_prices, horizon=6, num_samples=32, seed=3)
    assert forecast.paths.shape == (32, 6)
    # Every step is a return bin (a special token would decode to NaN).
    assert np.all(np.isin(forecast.paths, forecaster.tokenizer.bin_centers))


def test_path_summary_by_hand():
    paths = np.log([[1.02, 0.97], [0.99, 1.02], [1.01, 1.01], [0.98, 0.99]])
    forecast = Forecast.from_paths(paths, last_price=50.0, quantiles=(0.5,))
    # Prices after two bars: 50 * 1.02 * 0.97 = 49.47, 50.49, 51.005, 48.51; two of four end above 50.
    np.testing.assert_allclose(forecast.price_paths[:, 1], [49.47, 50.49, 51.005, 48.51])
    np.testing.assert_allclose(forecast.prob_up, [0.5, 0.5])
    # The median of the four two-bar log-returns lies halfway between the middle two, log(0.9894) and log(1.0098).
    assert forecast.price_quantiles[1, 0] == pytest.approx(50 * np.sqrt(0.9894 * 1.0098))


def test_seeded_sampling_is_reproducible(forecaster, random_walk_prices):
    first = forecaster.predict(random_walk_prices, horizon=3, num_samples=16, seed=5)
    second = forecaster.predict(random_walk_prices, horizon=3, num_samples=16, seed=5)
    np.testing.assert_array_equal(first.paths, second.paths)


def test_bad_arguments_are_rejected(forecaster, random_walk_prices):
    with pytest.raises(ValueError, match="horizon"):
        forecaster.predict(random_walk_prices, horizon=0)
    with pytest.raises(ValueError, match="quantile levels"):
        forecaster.predict(random_walk_prices, quantiles=[0.5, 1.0])
    with pytest.raises(ValueError, match="index 1"):
        forecaster.predict([100.0, -5.0])


def test_checkpoint_is_self_contained(forecaster, random_walk_prices, tmp_path):
    forecaster.save_pretrained(tmp_path)
    reloaded = Forecaster.from_pretrained(tmp_path)
    np.testing.assert_allclose(
        reloaded.predict(random_walk_prices).distribution.probs,
        forecaster.predict(random_walk_prices).distribution.probs,
        rtol=1e-6,
    )


@pytest.fixture
def skewed_distribution():
    tokenizer = ReturnTokenizer(num_bins=64, clip=0.1)
    probs = np.random.default_rng(2).dirichlet(np.full(64, 0.5), size=3)
    return BinnedDistribution(probs, tokenizer.bin_edges)


def test_quantiles_and_prob_up_by_hand():
    # 40% on [-2%, -1%], 40% on [-1%, 0], 20% on [0, 1%], spread uniformly inside each bin.
    distribution = BinnedDistribution([0.4, 0.4, 0.2, 0.0], [-0.02, -0.01, 0.0, 0.01, 0.02])
    # 10% is a quarter into the first bin, 50% a quarter into the second, 90% half-way into the third.
    np.testing.assert_allclose(distribution.quantile([0.1, 0.5, 0.9]), [-0.0175, -0.0075, 0.005])
    assert distribution.prob_up() == pytest.approx(0.2)
    assert distribution.cdf(-0.015) == pytest.approx(0.2)


def test_quantile_inverts_the_cdf(skewed_distribution):
    levels = np.array([0.01, 0.2, 0.5, 0.8, 0.99])
    quantiles = skewed_distribution.quantile(levels)
    for row in range(3):
        row_distribution = BinnedDistribution(skewed_distribution.probs[row], skewed_distribution.edges)
        np.testing.assert_allclose(row_distribution.cdf(quantiles[row]), levels, atol=1e-9)


def test_density_integrates_to_one_and_crps_matches_numeric_integral(skewed_distribution):
    row = BinnedDistribution(skewed_distribution.probs[0], skewed_distribution.edges)
    lo, hi = row.edges[0], row.edges[-1]
    total, _ = integrate.quad(lambda x: np.exp(row.log_density(x)), lo, hi, points=row.edges[1:-1], limit=500)
    assert total == pytest.approx(1.0, abs=1e-6)
    for observation in (-0.2, -0.01, 0.0, 0.003, 0.15):
        grid = np.linspace(min(lo, observation) - 0.01, max(hi, observation) + 0.01, 400_001)
        integrand = (row.cdf(grid) - (grid >= observation)) ** 2
        numeric = np.trapezoid(integrand, grid)
        assert row.crps(observation) == pytest.approx(numeric, rel=1e-3, abs=1e-7)


def test_mean_and_std_match_numeric_moments_of_the_density(skewed_distribution):
    row = BinnedDistribution(skewed_distribution.probs[1], skewed_distribution.edges)

    def moment(power):
        integrand = lambda x: x**power * np.exp(row.log_density(x))  # noqa: E731
        return integrate.quad(integrand, row.edges[0], row.edges[-1], points=row.edges[1:-1], limit=500)[0]

    assert row.mean() == pytest.approx(moment(1), rel=1e-6, abs=1e-12)
    assert row.std() == pytest.approx(np.sqrt(moment(2) - moment(1) ** 2), rel=1e-6)


def test_first_sampled_step_follows_the_exact_next_bar_distribution(forecaster, random_walk_prices):
    levels = np.linspace(0.05, 0.95, 19)
    exact = forecaster.predict(random_walk_prices)
    exact_quantiles = exact.distribution.quantile(levels)
    sampled = forecaster.predict(random_walk_prices, horizon=2, num_samples=3000, seed=0)
    first_steps = sampled.paths[:, 0]
    observed = (first_steps[:, None] <= exact_quantiles[None, :]).mean(axis=0)
    # Samples are bin centres, so each level may also be off by the mass of one bin (< 0.01 here).
    tolerance = 5 * np.sqrt(levels * (1 - levels) / len(first_steps)) + 0.01
    assert np.all(np.abs(observed - levels) <= tolerance)
    # Zero is a bin edge, so the share of sampled first steps above it estimates the exact P(up) without that error.
    binomial_error = np.sqrt(exact.prob_up[0] * (1 - exact.prob_up[0]) / len(first_steps))
    assert sampled.prob_up[0] == pytest.approx(exact.prob_up[0], abs=5 * binomial_error)
