"""hf-kvtrade: transformer forecasting of market data on Transformers and vLLM, with KV-cache policies for live use.

Importing the package registers the `kvtrade` model type with the Transformers Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_kvtrade import KVTradeConfig
from .distribution import BinnedDistribution
from .modeling_kvtrade import KVTradeForCausalLM, KVTradeModel, KVTradePreTrainedModel
from .tokenization_kvtrade import Encoding, ReturnTokenizer

AutoConfig.register(KVTradeConfig.model_type, KVTradeConfig, exist_ok=True)
AutoModel.register(KVTradeConfig, KVTradeModel, exist_ok=True)
AutoModelForCausalLM.register(KVTradeConfig, KVTradeForCausalLM, exist_ok=True)

# save_pretrained then copies the two model files next to the weights and writes `auto_map`, so a saved folder
# loads with trust_remote_code=True where hf_kvtrade is not installed (the Hub path). vLLM's Transformers backend
# looks for the AutoModel entry.
KVTradeConfig.register_for_auto_class()
KVTradeModel.register_for_auto_class("AutoModel")
KVTradeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

from .forecasting import Forecast, Forecaster  # noqa: E402  (needs the registered classes)

__version__ = "0.1.0"

__all__ = [
    "BinnedDistribution",
    "Encoding",
    "Forecast",
    "Forecaster",
    "KVTradeConfig",
    "KVTradeForCausalLM",
    "KVTradeModel",
    "KVTradePreTrainedModel",
    "ReturnTokenizer",
]
