"""KVTrade model configuration: a Llama-shaped decoder over return-bin tokens, with GQA and RoPE."""

from huggingface_hub.dataclasses import strict

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

# Mirrors ReturnTokenizer: ids 0..3 are pad, bos, eos and missing-bar, then one id per return bin. This file is
# copied next to the weights for `trust_remote_code`, so it cannot import the tokenizer module.
NUM_SPECIAL_TOKENS = 4


@strict
class KVTradeConfig(PreTrainedConfig):
    r"""
    Configuration of [`KVTradeForCausalLM`]. The defaults describe the `small` preset's shape and the default
    [`ReturnTokenizer`] grid, so `KVTradeConfig()` and `ReturnTokenizer()` always fit together.

    Args:
        num_bins (`int`): return bins of the tokenizer; `vocab_size` is `num_bins + 4` (pad, bos, eos, missing).
        return_clip (`float`): log-returns beyond +-`return_clip` fall into the end bins.
        mu_law (`float`): companding strength of the bin grid.
        num_key_value_heads (`int`): 1 gives multi-query attention, `num_attention_heads` gives multi-head
            attention, anything in between grouped-query attention.
        head_dim (`int`): 32 or 64 keep the model servable by vLLM's CPU attention kernels.
        sliding_window (`int`, *optional*): if set, every layer attends to at most this many past tokens.
        training_context_length (`int`, *optional*): the window length the model was trained on (set by
            `kvtrade train`): a context plus the tokens forecast from it never hold more. With `context_stride` it
            is the context policy (`hf_kvtrade.context.ContextPolicy`) that every forecasting path follows.
        context_stride (`int`, *optional*): how many tokens the context's anchor moves at a rebase once a history
            outgrows the window; defaults to half the window.

    ```python
    >>> from hf_kvtrade import KVTradeConfig, KVTradeForCausalLM
    >>> model = KVTradeForCausalLM(KVTradeConfig(num_key_value_heads=1))  # multi-query flavour
    ```"""

    model_type = "kvtrade"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

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
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float = 0.0
    sliding_window: int | None = None
    training_context_length: int | None = None
    context_stride: int | None = None
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        expected_vocab = self.num_bins + NUM_SPECIAL_TOKENS
        if self.vocab_size is None:
            self.vocab_size = expected_vocab
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            layer_type = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = [layer_type] * self.num_hidden_layers
        # save_pretrained merges the saving class into auto_map; the AutoModel entry must be there too, because
        # vLLM's Transformers backend loads the base model through it.
        kwargs["auto_map"] = {"AutoModel": "modeling_kvtrade.KVTradeModel", **(kwargs.get("auto_map") or {})}
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: catches shapes that would build a model the tokenizer or vLLM cannot use."""
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


__all__ = ["KVTradeConfig"]
