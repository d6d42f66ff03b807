"""hf-kvtrade: transformer forecasting of market data on Transformers and vLLM, with KV-cache policies for live use.

The public names load lazily (PEP 562), so `kvtrade --help` and the JSON-only parts (tokenizer, context policy,
clients' set-up) never import torch or Transformers. The first access to a model class, or an import of
``hf_kvtrade.forecasting``, registers the `kvtrade` model type with the Transformers Auto classes.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "BinnedDistribution": ".distribution",
    "Encoding": ".tokenization_kvtrade",
    "ReturnTokenizer": ".tokenization_kvtrade",
    "KVTradeConfig": ".configuration_kvtrade",
    "KVTradeModel": ".modeling_kvtrade",
    "KVTradeForCausalLM": ".modeling_kvtrade",
    "KVTradePreTrainedModel": ".modeling_kvtrade",
    "Forecast": ".distribution",
    "Forecaster": ".forecasting",
}
_LIGHT = {"BinnedDistribution", "Encoding", "Forecast", "ReturnTokenizer"}


def register_auto_classes() -> None:
    """Registers `kvtrade` with AutoConfig/AutoModel/AutoModelForCausalLM; idempotent. (A saved folder names its own
    classes for `trust_remote_code` in the config's `auto_map`.)"""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_kvtrade import KVTradeConfig
    from .modeling_kvtrade import KVTradeForCausalLM, KVTradeModel

    AutoConfig.register(KVTradeConfig.model_type, KVTradeConfig, exist_ok=True)
    AutoModel.register(KVTradeConfig, KVTradeModel, exist_ok=True)
    AutoModelForCausalLM.register(KVTradeConfig, KVTradeForCausalLM, exist_ok=True)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_kvtrade' has no attribute {name!r}")
    if name not in _LIGHT:
        register_auto_classes()
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [*_EXPORTS, "register_auto_classes"]
