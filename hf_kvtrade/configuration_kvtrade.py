"""KVTrade model configuration: Mistral's (a Llama with an optional sliding window) over return-bin tokens."""

from huggingface_hub.dataclasses import strict

from transformers.models.mistral.configuration_mistral import MistralConfig

# Mirrors ReturnTokenizer: ids 0..3 are pad, bos, eos and missing-bar, then one id per return bin. This file is
# copied next to the weights for `trust_remote_code`, so it cannot import the tokenizer module.
NUM_SPECIAL_TOKENS = 4


@strict
class KVTradeConfig(MistralConfig):
    r"""
    A [`MistralConfig`] whose defaults are the `small` preset's shape and the default [`ReturnTokenizer`] grid. The
    bin grid is kept here only: a checkpoint's tokenizer is `ReturnTokenizer.from_config` of its config.

    Args:
        num_bins (`int`): return bins of the tokenizer; `vocab_size` is `num_bins + 4` (pad, bos, eos, missing).
        return_clip (`float`): log-returns beyond +-`return_clip` fall into the end bins.
        mu_law (`float`): companding strength of the bin grid.
        head_dim (`int`): 32 or 64 keep the model servable by vLLM's CPU attention kernels.
        training_context_length (`int`, *optional*): the window the model was trained on; with `context_stride`
            (default half the window) the context policy (`hf_kvtrade.context.ContextPolicy`) of every forecast.
        context_stride (`int`, *optional*): tokens the context's anchor moves at a rebase.
    """

    model_type = "kvtrade"

    num_bins: int = 1024
    return_clip: float = 0.2
    mu_law: float = 255.0
    vocab_size: int | None = None
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 2
    head_dim: int = 32
    max_position_embeddings: int = 8192
    pad_token_id: int | None = 0
    sliding_window: int | None = None
    training_context_length: int | None = None
    context_stride: int | None = None
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        if self.vocab_size is None:
            self.vocab_size = self.num_bins + NUM_SPECIAL_TOKENS
        if self.layer_types is None:
            layer_type = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = [layer_type] * self.num_hidden_layers
        # The classes a folder loads with `trust_remote_code` (no hf_kvtrade: the Hub path; vLLM's backend: AutoModel).
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_kvtrade.KVTradeConfig",
                "AutoModel": "modeling_kvtrade.KVTradeModel",
                "AutoModelForCausalLM": "modeling_kvtrade.KVTradeForCausalLM",
            },
        )
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.vocab_size != self.num_bins + NUM_SPECIAL_TOKENS:
            raise ValueError(
                f"vocab_size ({self.vocab_size}) must equal num_bins + {NUM_SPECIAL_TOKENS} "
                f"({self.num_bins + NUM_SPECIAL_TOKENS}) so that token ids match the tokenizer's bins"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if getattr(self, "attention_bias", False):
            raise ValueError("attention_bias is not supported: Mistral's attention layers have no biases")


__all__ = ["KVTradeConfig"]
