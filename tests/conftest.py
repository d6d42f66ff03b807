import numpy as np
import pytest
import torch
from hypothesis import settings

from hf_kvtrade import KVTradeForCausalLM
from hf_kvtrade.presets import load_preset

# Property tests check behaviour, not speed: a loaded 2-core CI machine must not fail them on a per-example deadline.
settings.register_profile("kvtrade", deadline=None)
settings.load_profile("kvtrade")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of one-token steps: a second thread only waits at barriers on the CI machine's two shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def random_walk_prices():
    """A geometric random walk with 1% daily volatility: realistic scale for the default return grid."""
    rng = np.random.default_rng(7)
    return 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, 400)))


@pytest.fixture
def make_tiny_model():
    """Builds a randomly initialised tiny-preset model: make_tiny_model(attention="mqa", sliding_window=64)."""

    def build(attention="gqa", **overrides):
        return KVTradeForCausalLM(load_preset("tiny", attention=attention, **overrides)).eval()

    return build
