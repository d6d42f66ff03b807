"""vLLM plugin for KVTrade: serves `KVTradeForCausalLM` checkpoints with vLLM's native engine.

vLLM finds `register` through the `vllm.general_plugins` entry point and calls it in every process it starts
(API server, engine core, workers), so it must be idempotent. The model class is registered by its dotted path,
so vLLM imports the model module only in the processes that build the model.
"""

MODEL_ARCHITECTURE = "KVTradeForCausalLM"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from hf_kvtrade.configuration_kvtrade import KVTradeConfig

    # vLLM parses config.json with AutoConfig, which must know the custom `kvtrade` model type.
    AutoConfig.register(KVTradeConfig.model_type, KVTradeConfig, exist_ok=True)
    if MODEL_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MODEL_ARCHITECTURE, "vllm_plugin.kvtrade:KVTradeForCausalLM")
