import numpy as np
import pytest
import torch
from scipy import integrate

from hf_kvtrade import BinnedDistribution, Forecaster, ReturnTokenizer


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
    assert forecast.distribution.probs.sum() == pytest.approx(1.0)
    assert forecast.prob_up[0] + forecast.prob_down[0] == pytest.approx(1.0)
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
    assert np.all(np.isfinite(forecast.paths))
    assert forecast.price_paths[:, 0] == pytest.approx(forecast.last_price * np.exp(forecast.paths[:, 0]))
    np.testing.assert_allclose(forecast.prob_up, (np.cumsum(forecast.paths, 1) > 0).mean(0))


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


def test_mean_std_and_samples_agree(skewed_distribution):
    row = BinnedDistribution(skewed_distribution.probs[1], skewed_distribution.edges)
    samples = row.sample(200_000, np.random.default_rng(0))
    assert samples.mean() == pytest.approx(row.mean(), abs=4 * row.std() / np.sqrt(len(samples)))
    assert samples.std() == pytest.approx(row.std(), rel=0.01)


def test_first_sampled_step_follows_the_exact_next_bar_distribution(forecaster, random_walk_prices):
    levels = np.linspace(0.05, 0.95, 19)
    exact_quantiles = forecaster.predict(random_walk_prices).distribution.quantile(levels)
    first_steps = forecaster.predict(random_walk_prices, horizon=2, num_samples=3000, seed=0).paths[:, 0]
    observed = (first_steps[:, None] <= exact_quantiles[None, :]).mean(axis=0)
    # Samples are bin centres, so each level may also be off by the mass of one bin (< 0.01 here).
    tolerance = 5 * np.sqrt(levels * (1 - levels) / len(first_steps)) + 0.01
    assert np.all(np.abs(observed - levels) <= tolerance)
