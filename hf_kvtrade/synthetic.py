"""Seeded synthetic price series with known volatility dynamics, for pretraining before the real series.

Log-returns are ``r_t = mu + sqrt(h_t) z_t + J_t``: ``z`` Student-t scaled to unit variance, ``h`` the conditional
variance of GARCH(1,1), GJR-GARCH (leverage: ``gamma`` more after a fall), log-AR(1) stochastic volatility or a
two-state Markov regime, always with unconditional variance ``sigma**2``, and ``J`` optional compound-Poisson jumps.
Prices are rounded to a per-series tick, so quiet series show the zero returns of real quotes. docs/data.md gives
the parameter ranges.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import scipy.signal

MODELS = ("garch", "gjr", "sv", "regime")
SIGMA_RANGE = (1e-4, 5e-2)
RELATIVE_TICK_RANGE = (1e-6, 1e-3)


@dataclass(frozen=True)
class SyntheticParams:
    """Everything that defines one series' dynamics. Fields a model does not use keep their defaults."""

    model: str
    sigma: float  # unconditional std of the diffusive part, per bar
    nu: float = np.inf  # Student-t degrees of freedom of z (inf: Gaussian)
    mu: float = 0.0  # drift per bar
    # GARCH / GJR-GARCH
    alpha: float = 0.0
    beta: float = 0.0
    gamma: float = 0.0
    # stochastic volatility: log h_t - m = phi (log h_{t-1} - m) + vol_of_vol * eta_t
    phi: float = 0.0
    vol_of_vol: float = 0.0
    # regimes: probabilities of staying calm / turbulent; turbulent std = vol_ratio * calm std
    stay_calm: float = 1.0
    stay_turbulent: float = 1.0
    vol_ratio: float = 1.0
    # compound Poisson jumps
    jump_intensity: float = 0.0
    jump_mean: float = 0.0
    jump_std: float = 0.0
    # prices
    start_price: float = 100.0
    tick: float = 0.0  # 0: no rounding

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not self.nu > 2:
            raise ValueError(f"nu must be > 2 for a finite variance, got {self.nu}")
        if self.model in ("garch", "gjr") and not (self.alpha >= 0 and self.beta >= 0 and self.gamma >= 0
                                                    and self.persistence < 1):  # fmt: skip
            raise ValueError(f"GARCH needs alpha, beta, gamma >= 0 and alpha + beta + gamma/2 < 1, got {self}")
        if self.model == "sv" and not (0 <= self.phi < 1 and self.vol_of_vol >= 0):
            raise ValueError(f"SV needs 0 <= phi < 1 and vol_of_vol >= 0, got phi={self.phi}, "
                             f"vol_of_vol={self.vol_of_vol}")  # fmt: skip
        stays = (self.stay_calm, self.stay_turbulent)
        if self.model == "regime" and not (all(0 < stay < 1 for stay in stays) and self.vol_ratio >= 1):
            raise ValueError("regimes need stay probabilities strictly between 0 and 1 and vol_ratio >= 1")
        if self.jump_intensity < 0 or self.jump_std < 0 or self.tick < 0 or self.start_price <= 0:
            raise ValueError("jump_intensity, jump_std and tick must be >= 0 and start_price > 0")

    @property
    def persistence(self) -> float:
        """How slowly a GARCH variance shock decays (``gamma / 2``: symmetric ``z`` falls half the time)."""
        return self.alpha + self.beta + self.gamma / 2

    @property
    def omega(self) -> float:
        return self.sigma**2 * (1.0 - self.persistence)

    @property
    def turbulent_share(self) -> float:
        """Long-run share of bars in the turbulent regime."""
        return (1.0 - self.stay_calm) / (2.0 - self.stay_calm - self.stay_turbulent)

    @property
    def regime_stds(self) -> tuple[float, float]:
        """Calm and turbulent stds whose stationary mix has variance ``sigma**2``."""
        calm = self.sigma / np.sqrt(1.0 + self.turbulent_share * (self.vol_ratio**2 - 1.0))
        return calm, calm * self.vol_ratio


@dataclass
class SyntheticSeries:
    """One simulated series: its parameters, prices and the latent quantities the tests and oracles need."""

    name: str
    params: SyntheticParams
    frame: pd.DataFrame  # ``close`` (tick-rounded) on a UTC ``timestamp`` index
    returns: np.ndarray  # log-returns before rounding; close[t] follows return[t - 1]
    conditional_std: np.ndarray  # sqrt(h_t), the true diffusive std of each return
    jumps: np.ndarray  # number of jumps in each return
    regimes: np.ndarray | None = None  # 1 where turbulent (regime model only)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _nice_tick(size: float) -> float:
    """The largest of 1, 2, 5 times a power of ten that is <= ``size``."""
    power = 10.0 ** np.floor(np.log10(size))
    return float(max(step * power for step in (1.0, 2.0, 5.0) if step * power <= size * (1 + 1e-12)))


def sample_params(rng: np.random.Generator, model: str | None = None) -> SyntheticParams:
    """Draws one series' parameters (``model`` too, uniformly from :data:`MODELS`, unless given)."""
    model = model or str(rng.choice(MODELS))
    sigma = _log_uniform(rng, *SIGMA_RANGE)
    common = dict(
        model=model,
        sigma=sigma,
        nu=float(rng.uniform(4.2, 12.0)),
        mu=float(sigma * rng.normal(0.0, 0.01)),
        start_price=_log_uniform(rng, 1.0, 1e5),
    )
    dynamics: dict = {}
    if model in ("garch", "gjr"):
        persistence = float(rng.uniform(0.90, 0.995))
        alpha = float(rng.uniform(0.02, 0.12))
        gamma = float(rng.uniform(0.02, 0.12)) if model == "gjr" else 0.0
        beta = persistence - alpha - gamma / 2  # at least 0.72: the memory sits in beta, as in fitted models
        dynamics = dict(alpha=alpha, beta=beta, gamma=gamma)
    elif model == "sv":
        phi = float(rng.uniform(0.95, 0.995))
        stationary = float(rng.uniform(0.3, 0.8))  # std of log h: a calm-to-storm range of about e^(2*0.8)
        dynamics = dict(phi=phi, vol_of_vol=stationary * np.sqrt(1.0 - phi**2))
    else:
        dynamics = dict(
            stay_calm=float(1.0 - _log_uniform(rng, 1e-3, 2e-2)),  # calm spells of 50 to 1,000 bars
            stay_turbulent=float(1.0 - _log_uniform(rng, 5e-3, 5e-2)),  # storms of 20 to 200 bars
            vol_ratio=float(rng.uniform(2.0, 5.0)),
        )
    jumps: dict = {}
    if rng.random() < 0.5:
        jump_std = sigma * float(rng.uniform(3.0, 8.0))
        jumps = dict(
            jump_intensity=_log_uniform(rng, 1e-3, 2e-2),
            jump_mean=jump_std * float(rng.uniform(-0.5, 0.2)),  # crashes outnumber spikes
            jump_std=jump_std,
        )
    relative_tick = _log_uniform(rng, RELATIVE_TICK_RANGE[0], min(RELATIVE_TICK_RANGE[1], sigma))
    params = SyntheticParams(**common, **dynamics, **jumps)
    return replace(params, tick=_nice_tick(params.start_price * relative_tick))


def _garch_variance(params: SyntheticParams, z: np.ndarray) -> np.ndarray:
    h = np.empty(len(z))
    h_prev, e_prev = params.sigma**2, 0.0  # start at the unconditional variance, no shock
    omega, alpha, beta, gamma = params.omega, params.alpha, params.beta, params.gamma
    for t in range(len(z)):
        h_prev = omega + (alpha + (gamma if e_prev < 0 else 0.0)) * e_prev * e_prev + beta * h_prev
        h[t] = h_prev
        e_prev = np.sqrt(h_prev) * z[t]
    return h


def _sv_variance(params: SyntheticParams, n: int, rng: np.random.Generator) -> np.ndarray:
    s = params.vol_of_vol / np.sqrt(1.0 - params.phi**2)  # the stationary std of log h
    mean = np.log(params.sigma**2) - s**2 / 2  # so that E[h] = exp(mean + s^2/2) = sigma^2
    noise = rng.standard_normal(n) * params.vol_of_vol
    start = rng.standard_normal() * s  # from the stationary distribution
    log_h = scipy.signal.lfilter([1.0], [1.0, -params.phi], noise, zi=[params.phi * start])[0]
    return np.exp(mean + log_h)


def _regime_path(params: SyntheticParams, n: int, rng: np.random.Generator) -> np.ndarray:
    leave = np.array([1.0 - params.stay_calm, 1.0 - params.stay_turbulent])
    draws = rng.random(n)
    state = int(rng.random() < params.turbulent_share)
    states = np.empty(n, dtype=np.int8)
    for t in range(n):
        if draws[t] < leave[state]:
            state = 1 - state
        states[t] = state
    return states


def simulate(params: SyntheticParams, length: int, rng: np.random.Generator, name: str = "synthetic",
             start: str = "2000-01-03", freq: str = "1h") -> SyntheticSeries:  # fmt: skip
    """``length`` prices (``length - 1`` returns) of one series with ``params``."""
    if length < 2:
        raise ValueError(f"need at least 2 prices, got {length}")
    n = length - 1
    nu = params.nu
    z = rng.standard_normal(n) if np.isinf(nu) else rng.standard_t(nu, n) * np.sqrt((nu - 2.0) / nu)  # unit variance
    regimes = None
    if params.model in ("garch", "gjr"):
        variance = _garch_variance(params, z)
    elif params.model == "sv":
        variance = _sv_variance(params, n, rng)
    else:
        regimes = _regime_path(params, n, rng)
        variance = np.asarray(params.regime_stds)[regimes] ** 2
    jumps = rng.poisson(params.jump_intensity, n) if params.jump_intensity > 0 else np.zeros(n, dtype=np.int64)
    jump_sizes = params.jump_mean * jumps + params.jump_std * np.sqrt(jumps) * rng.standard_normal(n)
    std = np.sqrt(variance)
    returns = params.mu + std * z + jump_sizes
    prices = params.start_price * np.exp(np.concatenate([[0.0], np.cumsum(returns)]))
    if params.tick > 0:
        # Whole ticks, at least one (a quote never rounds to zero), written with the tick's decimals as a quote
        # would be: 401 ticks of 0.05 are 20.05, not 20.050000000000001.
        decimals = max(0, int(-np.floor(np.log10(params.tick) + 1e-9)))
        prices = np.round(np.maximum(np.round(prices / params.tick), 1.0) * params.tick, decimals)
    index = pd.date_range(start, periods=length, freq=freq, tz="UTC", name="timestamp")
    frame = pd.DataFrame({"close": prices}, index=index)
    return SyntheticSeries(name, params, frame, returns, std, jumps, regimes)


def generate(num_series: int, length: int, seed: int, models: tuple[str, ...] = MODELS,
             freq: str = "1h") -> list[SyntheticSeries]:  # fmt: skip
    """``num_series`` series of ``length`` prices, models cycling through ``models``; series ``i`` draws from the
    ``i``-th child of ``numpy.random.SeedSequence(seed)``, so it is the same whatever ``num_series``."""
    if not models or any(model not in MODELS for model in models):
        raise ValueError(f"models must be a non-empty subset of {MODELS}, got {models}")
    series = []
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(num_series)):
        rng, model = np.random.default_rng(child), models[i % len(models)]
        series.append(simulate(sample_params(rng, model), length, rng, name=f"synthetic_{model}_{i:05d}", freq=freq))
    return series


def synthetic_frames(num_series: int, length: int, seed: int, models: tuple[str, ...] = MODELS,
                     freq: str = "1h") -> dict[str, pd.DataFrame]:  # fmt: skip
    """Price frames by name, shaped like :func:`hf_kvtrade.data.load_series` output (``close`` only)."""
    return {series.name: series.frame for series in generate(num_series, length, seed, models, freq)}


def describe(series: list[SyntheticSeries]) -> pd.DataFrame:
    """One row of parameters per series (for model cards and docs)."""
    return pd.DataFrame([{"name": s.name, **asdict(s.params)} for s in series]).set_index("name")


__all__ = [
    "MODELS",
    "SyntheticParams",
    "SyntheticSeries",
    "describe",
    "generate",
    "sample_params",
    "simulate",
    "synthetic_frames",
]
