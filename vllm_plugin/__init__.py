"""vLLM plugin for KVTrade: serves `KVTradeForCausalLM` checkpoints with vLLM's own Llama, which reads all of a
KVTrade model (Transformers' Mistral: Llama's layers and weight names) from its config, per-layer windows included.

vLLM calls `register` (entry point `vllm.general_plugins`) in every process it starts, so it must be idempotent.
"""

def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from hf_kvtrade.configuration_kvtrade import KVTradeConfig

    # vLLM parses config.json with AutoConfig, which must know the custom `kvtrade` model type.
    AutoConfig.register(KVTradeConfig.model_type, KVTradeConfig, exist_ok=True)
    # Registering again only replaces the entry with the same class.
    ModelRegistry.register_model("KVTradeForCausalLM", "vllm.model_executor.models.llama:LlamaForCausalLM")
