import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate, stats

from hf_kvtrade import BinnedDistribution, Forecaster, KVTradeForCausalLM, ReturnTokenizer
from hf_kvtrade.evaluation import (
    METRICS,
    MODEL_NAMES,
    GaussianForecast,
    StudentTForecast,
    check_targets,
    context_length_curve,
    evaluate,
    evaluate_series,
    format_table,
    heldout_series_names,
    markdown_tables,
    model_forecast,
    score,
    update_model_card,
)
from hf_kvtrade.context import ContextPolicy
from hf_kvtrade.presets import load_preset

DF, SCALE = 4.0, 0.01


def student_t_returns(size, seed=0):
    return stats.t.rvs(DF, scale=SCALE, size=size, random_state=np.random.default_rng(seed))


def student_t_prices(size, seed=0):
    index = pd.date_range("2000-01-03", periods=size, freq="D", tz="UTC")
    prices = 100 * np.exp(np.concatenate([[0.0], np.cumsum(student_t_returns(size - 1, seed))]))
    return pd.DataFrame({"close": prices}, index=index)


TRUE_NLL = stats.t.entropy(DF, scale=SCALE)  # expected -log density of the true distribution


def test_gaussian_crps_closed_form_matches_the_integral():
    forecast = GaussianForecast(mean=np.array([0.001]), std=np.array([0.02]))
    for x in (-0.05, 0.0, 0.013):
        integrand = lambda t: (stats.norm.cdf(t, 0.001, 0.02) - (t >= x)) ** 2  # noqa: E731
        numeric = integrate.quad(integrand, -1, x, points=[x])[0] + integrate.quad(integrand, x, 1)[0]
        assert forecast.crps(x)[0] == pytest.approx(numeric, rel=1e-6)


def test_student_t_forecast_matches_a_finely_binned_t():
    # The same distribution two ways: closed forms vs BinnedDistribution on a fine grid.
    edges = np.linspace(-0.5, 0.5, 20001)
    probs = np.diff(stats.t.cdf(edges, DF, scale=SCALE))
    binned = BinnedDistribution(probs[None], edges)
    exact = StudentTForecast(loc=np.zeros(1), scale=np.full(1, SCALE), df=DF)
    x = np.array([-0.03, 0.0, 0.004])
    assert exact.crps(x) == pytest.approx(binned.crps(x).ravel(), rel=1e-3)
    assert exact.log_density(x) == pytest.approx(binned.log_density(x).ravel(), abs=5e-3)  # bin width 5e-5
    assert exact.quantile([0.05, 0.95])[0] == pytest.approx(binned.quantile([0.05, 0.95])[0], rel=1e-3)


def test_score_of_the_true_distribution_on_iid_student_t_returns():
    returns = student_t_returns(20000)
    truth = StudentTForecast(loc=np.zeros(len(returns)), scale=np.full(len(returns), SCALE), df=DF)
    metrics = score(truth, returns)
    tolerance = 4 * np.sqrt(0.25 / len(returns))  # four binomial standard errors
    assert metrics["coverage_50"] == pytest.approx(0.5, abs=tolerance)
    assert metrics["coverage_90"] == pytest.approx(0.9, abs=tolerance)
    assert metrics["nll"] == pytest.approx(TRUE_NLL, abs=0.03)
    # A symmetric forecast never says "up", so it is right exactly on the bars that did not go up.
    assert metrics["direction_acc"] == pytest.approx(np.mean(returns <= 0))
    # Expected CRPS of the true t (the mean of the closed form over the truth) is its lowest possible value.
    wider = StudentTForecast(loc=truth.loc, scale=truth.scale * 1.5, df=DF)
    assert score(wider, returns)["crps"] > metrics["crps"]
    assert score(wider, returns)["coverage_90"] > 0.95
    # The true forecast's PIT is uniform; an over-dispersed one piles PIT values in the middle (a hump).
    assert metrics["pit_distance"] < 0.02
    assert score(wider, returns)["pit_distance"] > 0.1


def test_baselines_recover_the_known_answer_on_iid_student_t_prices():
    results = evaluate({"student_t": student_t_prices(6000)})
    assert set(results["models"]) == {"random_walk", "garch_t", "unconditional"}
    models = results["models"]
    for name in ("garch_t", "unconditional"):  # both contain the true model
        assert models[name]["nll"] == pytest.approx(TRUE_NLL, abs=0.08)
        assert models[name]["coverage_90"] == pytest.approx(0.9, abs=0.05)
    # A Gaussian with a 20-bar volatility estimate is the wrong shape for t(4) noise.
    assert models["random_walk"]["nll"] > models["unconditional"]["nll"]
    assert results["num_bars"] == 600
    table = format_table(results)
    assert all(metric in table for metric in METRICS)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    # A 32-token policy window rebased every 12 tokens, so a 300-bar series crosses many anchors.
    return KVTradeForCausalLM(load_preset("tiny", training_context_length=32, context_stride=12)).eval()


def test_batched_evaluation_equals_the_forecaster_at_every_bar(tiny_model):
    tokenizer = ReturnTokenizer.from_config(tiny_model.config)
    closes = student_t_prices(300, seed=1)["close"].to_numpy()
    ids = tokenizer.encode(closes)
    first_target = 200
    batched = model_forecast(tiny_model, tokenizer, ids, first_target, ContextPolicy(32, 12), batch_size=3)
    forecaster = Forecaster(tiny_model, tokenizer)
    for target in range(first_target, len(ids)):
        # The forecast of bar `target` from the prices before it, exactly as a user would ask for it.
        expected = forecaster.predict(closes[:target]).distribution
        np.testing.assert_allclose(batched.probs[target - first_target], expected.probs, rtol=1e-4, atol=1e-7)


def test_model_is_scored_by_the_same_code_as_the_baselines(tiny_model):
    tokenizer = ReturnTokenizer.from_config(tiny_model.config)
    bars, target = evaluate_series(student_t_prices(400), tiny_model, tokenizer)
    assert list(bars) == list(MODEL_NAMES)
    for terms in bars.values():
        assert set(terms) == set(METRICS) - {"pit_distance"} | {"pit"}
        assert all(len(values) == len(target) == 40 for values in terms.values())
        assert np.all(np.isfinite(terms["nll"]))
    # An untrained model is close to uniform over 1024 bins: far worse than the true-shape baselines.
    assert np.mean(bars["kvtrade"]["nll"]) > np.mean(bars["unconditional"]["nll"])


def test_heldout_series_exclude_test_periods_inside_other_training_periods():
    daily = pd.date_range("2000-01-01", periods=1000, freq="D", tz="UTC")
    frames = {
        "early": pd.DataFrame({"close": np.linspace(1, 2, 500)}, index=daily[:500]),
        "late": pd.DataFrame({"close": np.linspace(1, 2, 1000)}, index=daily),
        "hourly": pd.DataFrame({"close": np.linspace(1, 2, 100)}, index=pd.date_range("2000-01-01", periods=100, freq="h", tz="UTC")),
    }
    # "early" is tested on days that "late" trains on; hourly bars only compete with hourly bars.
    assert heldout_series_names(frames) == ["late", "hourly"]
    # A series of another market does not compete either: "early" is held out once "late" trades elsewhere.
    assert heldout_series_names(frames, {"early": "equity", "late": "crypto"}) == ["early", "late", "hourly"]


def test_model_card_gets_one_evaluation_section(tmp_path):
    from huggingface_hub import ModelCard

    (tmp_path / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# kvtrade-small\n\nTrained.\n")
    results = evaluate({"student_t": student_t_prices(400)})
    results["context_policy"] = {"window": 256, "stride": 128}
    update_model_card(tmp_path, results, "kvtrade evaluate")
    update_model_card(tmp_path, results, "kvtrade evaluate")  # a second run replaces the section
    card = ModelCard.load(tmp_path / "README.md")
    assert card.text.count("## Test-period evaluation") == 1
    assert "Trained." in card.text and "| garch_t |" in card.text and card.data.library_name == "transformers"


def _results_with(kvtrade_nll: float, coverage_90: float) -> dict:
    def model(nll, coverage_90=0.9):
        return {"nll": nll, "crps": 0.01, "coverage_50": 0.5, "coverage_90": coverage_90, "direction_acc": 0.5, "pit_distance": 0.01}

    baselines = {"random_walk": model(-2.0), "garch_t": model(-2.2), "unconditional": model(-2.1)}
    series = {"good": {"num_bars": 10, "models": {"kvtrade": model(-2.3), **baselines}},
              "bad": {"num_bars": 10, "models": {"kvtrade": model(kvtrade_nll, coverage_90), **baselines}}}  # fmt: skip
    return {"num_bars": 20, "models": {"kvtrade": model(kvtrade_nll), **baselines}, "series": series}


def test_targets_are_checked_per_series_and_in_aggregate():
    results = _results_with(kvtrade_nll=-2.05, coverage_90=0.95)
    targets = check_targets(results)
    assert targets["series"]["good"] == dict.fromkeys(targets["series"]["good"], True)
    # Beats the random walk but not the unconditional t, and its 90% intervals are too wide.
    assert targets["series"]["bad"] == {
        "nll_vs_random_walk": True, "nll_vs_unconditional": False, "coverage_50": True, "coverage_90": False,
    }  # fmt: skip
    assert targets["aggregate"] == {"nll_vs_garch_t": False}
    results["targets"] = targets
    table = format_table(results)
    assert "MISSED nll_vs_unconditional, coverage_90" in table and "target aggregate NLL <= garch_t: MISSED" in table
    assert "target coverage_90 on every series: MISSED (1/2)" in table
    assert "missed: nll_vs_unconditional, coverage_90" in markdown_tables(results)


def test_context_length_curve_refuses_positions_beyond_the_trained_window(tiny_model):
    tokenizer = ReturnTokenizer.from_config(tiny_model.config)
    frames = {"student_t": student_t_prices(400)}
    curve = context_length_curve(frames, tiny_model, tokenizer, [8, 32])
    assert list(curve) == [8, 32] and all(np.isfinite(list(curve.values())))
    with pytest.raises(ValueError, match=r"\[4, 32\]"):
        context_length_curve(frames, tiny_model, tokenizer, [64])
