"""KVTrade: Transformers' Mistral (Llama with an optional sliding window) over return-bin tokens.

The next-token distribution over return bins is the forecast distribution of the next bar's log-return. The
layers are Mistral's own (GQA, RoPE, eager/sdpa/flash attention through `ALL_ATTENTION_FUNCTIONS`), so the weight
names are Llama's and vLLM serves the same `model.safetensors` with its own Llama (see `vllm_plugin`).
"""

from transformers.models.mistral.modeling_mistral import (
    MistralForCausalLM,
    MistralModel,
    MistralPreTrainedModel,
)

from .configuration_kvtrade import KVTradeConfig


class KVTradePreTrainedModel(MistralPreTrainedModel):
    config: KVTradeConfig


class KVTradeModel(KVTradePreTrainedModel, MistralModel):
    pass


class KVTradeForCausalLM(KVTradePreTrainedModel, MistralForCausalLM):
    # save_pretrained copies this file and the config's next to the weights, for `trust_remote_code`.
    _auto_class = "AutoModelForCausalLM"


__all__ = ["KVTradeForCausalLM", "KVTradeModel", "KVTradePreTrainedModel"]
