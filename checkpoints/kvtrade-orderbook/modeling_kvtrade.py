"""KVTrade: Transformers' Mistral over return-bin tokens; the next-token distribution is the forecast of the next
bar's log-return. The weight names are Llama's, so vLLM serves `model.safetensors` with its own Llama."""

from transformers.models.mistral.modeling_mistral import MistralForCausalLM, MistralModel, MistralPreTrainedModel

from .configuration_kvtrade import KVTradeConfig


class KVTradePreTrainedModel(MistralPreTrainedModel):
    config: KVTradeConfig


class KVTradeModel(KVTradePreTrainedModel, MistralModel):
    pass


class KVTradeForCausalLM(KVTradePreTrainedModel, MistralForCausalLM):
    # save_pretrained copies this file and the config's next to the weights, for `trust_remote_code`.
    _auto_class = "AutoModelForCausalLM"


__all__ = ["KVTradeForCausalLM", "KVTradeModel", "KVTradePreTrainedModel"]
