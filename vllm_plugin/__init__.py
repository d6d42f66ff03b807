"""vLLM plugin for KVTrade: serves `KVTradeForCausalLM` checkpoints with vLLM's own Llama.

A KVTrade model is Transformers' Mistral, i.e. a Llama (GQA, RoPE, RMSNorm, SiLU-gated MLP, Llama's weight
names) whose config may set a sliding window; vLLM's `LlamaForCausalLM` reads all of that from the config,
including the per-layer window from `layer_types`. Its Transformers-vs-vLLM logprob parity is tested in
`tests/test_vllm_engine.py`.

vLLM finds `register` through the `vllm.general_plugins` entry point and calls it in every process it starts
(API server, engine core, workers), so it must be idempotent.
"""

MODEL_ARCHITECTURE = "KVTradeForCausalLM"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from hf_kvtrade.configuration_kvtrade import KVTradeConfig

    # vLLM parses config.json with AutoConfig, which must know the custom `kvtrade` model type.
    AutoConfig.register(KVTradeConfig.model_type, KVTradeConfig, exist_ok=True)
    if MODEL_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MODEL_ARCHITECTURE, "vllm.model_executor.models.llama:LlamaForCausalLM")
