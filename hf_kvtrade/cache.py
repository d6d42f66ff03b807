"""KV cache policies for endless market streams, as Transformers `Cache`s of one layer object per decoder layer.

They plug into `model(..., past_key_values=cache)` and `generate` unchanged (MHA, GQA, MQA), and report `nbytes()`
(every byte kept; [`kv_cache_bytes`] before a cache exists) and `num_tokens_held()`: [`FullKVCache`] (the reference,
preallocated), [`QuantizedKVCache`] (KIVI int8/int4), [`SinkKVCache`] (StreamingLLM sinks plus a window, constant
memory), [`SelectiveKVCache`] (H2O, recency or hybrid eviction to a budget), and [`PrefixedCache`] (any but the sink
one behind a shared prefix, read by reference). As masks and `generate` expect, `get_seq_length()` counts tokens
*seen*, and `get_mask_sizes(q)` puts the newest `q` keys at the queries' positions; older kept tokens are in every
query's past, so the causal mask leaves them visible. Rows of a batch must be unpadded. Policy guide:
docs/cache_policies.md.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

from .context import ContextPolicy

CACHE_POLICIES = ("full", "int8", "int4", "sink", "selective")
SELECTIVE_POLICIES = ("h2o", "recency", "hybrid")

# Float16 scales and zero points: float32 ones would add a quarter byte per int8 element, which alone breaks a 0.27x
# budget. Quantization uses the stored float16 values, so its error bound holds for what is kept.
QUANTIZATION_PARAMETER_DTYPE = torch.float16
_SMALLEST_NORMAL_FLOAT16 = 2.0**-14


def _decoder_config(config: PreTrainedConfig) -> PreTrainedConfig:
    config = config.get_text_config(decoder=True)
    other_layer_types = set(config.layer_types or ["full_attention"]) - {"full_attention"}
    if other_layer_types:
        raise ValueError(
            f"the KV cache policies need full-attention layers only, got layer types {sorted(other_layer_types)}; "
            "build the model without sliding_window to use them"
        )
    return config


def _window(config: PreTrainedConfig, context_policy: ContextPolicy | None) -> int:
    return (context_policy or ContextPolicy.from_config(config)).window


def kv_cache_bytes(config: PreTrainedConfig, num_tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the keys and values of ``num_tokens`` tokens in every layer: what a [`FullKVCache`] of that many
    tokens allocates, known before allocating it."""
    config = _decoder_config(config)
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element_size * num_tokens


def _round_float16(tensor: torch.Tensor, toward: float) -> torch.Tensor:
    """``tensor`` as float16, rounded toward ``-inf`` or ``+inf`` instead of to nearest."""
    rounded = tensor.to(QUANTIZATION_PARAMETER_DTYPE)
    overshoot = rounded.float() > tensor if toward < 0 else rounded.float() < tensor
    return torch.where(overshoot, torch.nextafter(rounded, torch.full_like(rounded, toward)), rounded)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Packs codes in ``[0, 15]`` two per byte along the last dimension, which must have even size."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def quantize(tensor: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization with one (scale, zero point) per slice reduced over ``dim``.

    Returns uint8 ``codes`` (int4 packed two per byte along the last dimension) and float16 ``scale`` and ``zero``
    with ``dim`` kept as size 1. Rounding the zero point down and the scale up keeps every value within ``scale / 2``.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    levels = 2**bits - 1
    tensor = tensor.float()
    zero = _round_float16(tensor.amin(dim=dim, keepdim=True), toward=float("-inf"))
    spread = tensor.amax(dim=dim, keepdim=True) - zero.float()
    scale = _round_float16((spread / levels).clamp_min(_SMALLEST_NORMAL_FLOAT16), toward=float("inf"))
    codes = ((tensor - zero.float()) / scale.float()).round().clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        codes = pack_int4(codes)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of [`quantize`], in float32."""
    if bits == 4:
        codes = unpack_int4(codes)
    return codes.float() * scale.float() + zero.float()


class KVPolicyLayer(CacheLayerMixin):
    """Shared plumbing of the policy layers: seen-token counting, mask sizes, beam reordering and byte accounting,
    over the batch-major tensors a subclass names in ``state_names`` (so no piece of state can be forgotten)."""

    # Evicted or quantized tokens cannot be restored, so assisted decoding must not try to roll the cache back.
    is_croppable = False
    state_names: tuple[str, ...] = ("keys", "values")
    # The states whose token axes together count the tokens held.
    token_states: tuple[str, ...] = ("keys",)

    def __init__(self):
        super().__init__()
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = self.keys.clone()
        self.is_initialized = True

    def num_tokens_held(self) -> int:
        return sum(getattr(self, name).shape[-2] for name in self.token_states) if self.is_initialized else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self._append(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        return keys, values

    @abstractmethod
    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new tokens by the layer's policy; returns the keys and values their attention reads."""

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.state_names) if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.num_tokens_held()
        return held + query_length, self.cumulative_length - held

    def reset(self) -> None:
        for name in self.state_names:
            setattr(self, name, None)
        self.is_initialized = False
        self.cumulative_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # Called by beam search; the mixin's version would reorder only keys and values.
        if self.is_initialized:
            for name in self.state_names:
                state = getattr(self, name)
                setattr(self, name, state.index_select(0, beam_idx.to(state.device)))


class KIVILayer(KVPolicyLayer):
    """One layer of [`QuantizedKVCache`].

    Keys are quantized per channel over blocks of ``residual_length`` tokens (outlier channels get their own range),
    values per token over groups of ``value_group_size`` channels spanning the KV heads, as in KIVI. The newest
    tokens wait in full precision (``keys``/``values``) until ``residual_length`` of them move over as one key block.
    Transformers' `QuantizedLayer` re-quantizes the whole dequantized cache at every flush (compounding the error)
    and quantizes keys and values alike, hence a layer of our own.
    """

    state_names = ("keys", "values", "key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")
    token_states = ("key_codes", "keys")

    def __init__(self, bits: int, residual_length: int, value_group_size: int):
        super().__init__()
        self.bits = bits
        self.residual_length = residual_length
        self.value_group_size = value_group_size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # Quantizing no tokens gives the quantized state its empty shapes and dtypes.
        for name, tensor in zip(self.state_names[2:], self._quantized_oldest(0)):
            setattr(self, name, tensor)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys_out = torch.cat([self._dequantized_keys(), self.keys, key_states], dim=-2)
        values_out = torch.cat([self._dequantized_values(), self.values, value_states], dim=-2)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        flushed = self.keys.shape[-2] // self.residual_length * self.residual_length
        if flushed:
            # Key state is (batch, heads, tokens, ...), value state (batch, tokens, groups, ...).
            for name, dim, tensor in zip(self.state_names[2:], (2, 2, 2, 1, 1, 1), self._quantized_oldest(flushed)):
                setattr(self, name, torch.cat([getattr(self, name), tensor], dim=dim))
            self.keys, self.values = self.keys[..., flushed:, :], self.values[..., flushed:, :]
        return keys_out, values_out

    def _quantized_oldest(self, count: int) -> tuple[torch.Tensor, ...]:
        """Key codes, scales and zeros, then value ones, of the oldest ``count`` full-precision tokens."""
        # Explicit sizes, not -1: at initialization ``count`` is 0.
        (batch, heads, _, head_dim), block, group = self.keys.shape, self.residual_length, self.value_group_size
        blocks = self.keys[..., :count, :].reshape(batch, heads, count // block, block, head_dim)
        codes, scale, zero = quantize(blocks, self.bits, dim=-2)
        groups = self.values[..., :count, :].transpose(1, 2).reshape(batch, count, heads * head_dim // group, group)
        return codes.flatten(2, 3), scale.squeeze(-2), zero.squeeze(-2), *quantize(groups, self.bits, dim=-1)

    def _dequantized_keys(self) -> torch.Tensor:
        batch, heads, num_tokens, packed_dim = self.key_codes.shape
        block = self.residual_length
        blocks = self.key_codes.reshape(batch, heads, num_tokens // block, block, packed_dim)
        keys = dequantize(blocks, self.key_scale.unsqueeze(-2), self.key_zero.unsqueeze(-2), self.bits)
        return keys.reshape(batch, heads, num_tokens, self.keys.shape[-1]).to(self.dtype)

    def _dequantized_values(self) -> torch.Tensor:
        batch, num_tokens = self.value_codes.shape[:2]
        heads, head_dim = self.values.shape[1], self.values.shape[-1]
        values = dequantize(self.value_codes, self.value_scale, self.value_zero, self.bits)
        return values.reshape(batch, num_tokens, heads, head_dim).transpose(1, 2).to(self.dtype)


class SinkLayer(KVPolicyLayer):
    """One layer of [`SinkKVCache`]: the first ``num_sink_tokens`` keys and values plus the newest ``window``.

    Sink keys are kept as the model rotated them and turned forward by the number of evicted tokens when read, so
    every query sees them right before the window, as in StreamingLLM. Rotating from the stored keys each time,
    rather than step by step, keeps rounding from piling up over a long stream.
    """

    state_names = ("sink_keys", "sink_values", "keys", "values")
    token_states = ("sink_keys", "keys")

    def __init__(self, num_sink_tokens: int, window: int, rotary_embedding: nn.Module):
        super().__init__()
        self.num_sink_tokens = num_sink_tokens
        self.window = window
        self.rotary_embedding = rotary_embedding

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.sink_keys, self.sink_values = self.keys.clone(), self.values.clone()

    def get_max_length(self) -> int:
        return self.num_sink_tokens + self.window

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        evicted = self.cumulative_length - self.num_tokens_held()
        keys_out = torch.cat([self._shifted_sink_keys(evicted), self.keys, key_states], dim=-2)
        values_out = torch.cat([self.sink_values, self.values, value_states], dim=-2)

        free_sinks = self.num_sink_tokens - self.sink_keys.shape[-2]
        if free_sinks > 0:
            self.sink_keys = torch.cat([self.sink_keys, key_states[..., :free_sinks, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[..., :free_sinks, :]], dim=-2)
            key_states, value_states = key_states[..., free_sinks:, :], value_states[..., free_sinks:, :]
        self.keys = torch.cat([self.keys, key_states], dim=-2)[..., -self.window :, :]
        self.values = torch.cat([self.values, value_states], dim=-2)[..., -self.window :, :]
        return keys_out, values_out

    def _shifted_sink_keys(self, shift: int) -> torch.Tensor:
        if shift == 0 or self.sink_keys.shape[-2] == 0:
            return self.sink_keys
        position_ids = torch.tensor([[shift]], device=self.sink_keys.device)
        cos, sin = self.rotary_embedding(self.sink_keys, position_ids=position_ids)
        return self.sink_keys * cos.unsqueeze(1) + rotate_half(self.sink_keys) * sin.unsqueeze(1)


class SelectiveLayer(KVPolicyLayer):
    """One layer of [`SelectiveKVCache`]: at most ``budget`` tokens per KV head, always the sink tokens first.

    Kept tokens stay in stream order, each KV head choosing its own. ``scores`` holds the attention each kept token
    has received so far, summed over queries and over the query heads that share the KV head.
    """

    def __init__(self, budget: int, policy: str, num_sink_tokens: int):
        super().__init__()
        self.budget = budget
        self.policy = policy
        self.num_sink_tokens = num_sink_tokens
        self.uses_attention = policy != "recency"
        if self.uses_attention:
            self.state_names = ("keys", "values", "scores")
        self.awaiting_attention = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.uses_attention:
            self.scores = torch.zeros((*key_states.shape[:2], 0), dtype=torch.float32, device=key_states.device)

    def get_max_length(self) -> int:
        return self.budget

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.awaiting_attention:
            raise RuntimeError(
                f"selective policy {self.policy!r} ranks tokens by the attention they receive, but the last forward "
                "pass reported none: call hf_kvtrade.cache.track_attention(model) once and run the model with "
                "attn_implementation='eager'"
            )
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.uses_attention:
            new_scores = self.scores.new_zeros((*key_states.shape[:2], key_states.shape[-2]))
            self.scores = torch.cat([self.scores, new_scores], dim=-1)
            self.awaiting_attention = True
            return self.keys, self.values
        keys_out, values_out = self.keys, self.values
        self._evict()
        return keys_out, values_out

    def observe_attention(self, attn_weights: torch.Tensor | None) -> None:
        """Adds the attention weights of the forward pass that just used this layer, then evicts to the budget."""
        if attn_weights is None:
            raise ValueError(
                f"selective policy {self.policy!r} needs attention weights, which only eager attention returns: "
                "load or set the model with attn_implementation='eager'"
            )
        batch, kv_heads, held = self.scores.shape
        received = attn_weights.float().sum(dim=2).reshape(batch, kv_heads, -1, held).sum(dim=2)
        self.scores = self.scores + received
        self.awaiting_attention = False
        self._evict()

    def _evict(self) -> None:
        held = self.keys.shape[-2]
        if held <= self.budget:
            return
        sinks, free = self.num_sink_tokens, self.budget - self.num_sink_tokens
        batch, kv_heads = self.keys.shape[:2]
        recent = {"recency": free, "h2o": 0, "hybrid": free // 2}[self.policy]
        heavy = free - recent
        parts = [torch.arange(sinks, device=self.keys.device).expand(batch, kv_heads, sinks)]
        if heavy:
            candidates = self.scores[..., sinks : held - recent]
            parts.append(candidates.topk(heavy, dim=-1).indices.sort(dim=-1).values + sinks)
        parts.append(torch.arange(held - recent, held, device=self.keys.device).expand(batch, kv_heads, recent))
        kept = torch.cat(parts, dim=-1)
        token_index = kept.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, token_index)
        self.values = self.values.gather(2, token_index)
        if self.uses_attention:
            self.scores = self.scores.gather(2, kept)


class KVPolicyCache(Cache):
    """A `Cache` of [`KVPolicyLayer`]s, one per decoder layer, with the byte and token accounting of its layers."""

    def nbytes(self) -> int:
        """Bytes of every tensor the cache keeps: payload, scales, zero points, scores."""
        return sum(layer.nbytes() for layer in self.layers)

    def num_tokens_held(self) -> int:
        """Tokens the cache holds per layer and KV head (the most any layer holds)."""
        return max(layer.num_tokens_held() for layer in self.layers)


class FullKVLayer(KVPolicyLayer):
    """One layer of [`FullKVCache`]: keys and values in buffers of ``capacity`` tokens, filled front to back.

    ``update`` returns views of the filled part, so attention costs follow the real history, and a single query
    needs no mask. A write past the capacity doubles the buffers (the streaming engine sizes them never to).
    """

    is_croppable = True

    def __init__(self, capacity: int):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 token, got {capacity}")
        self.capacity = capacity
        self.growable = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._grow(self.capacity)

    def bind(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Makes caller-owned buffers (e.g. views of a slot pool) this layer's storage, which then cannot grow.

        The tokens written so far must already be in them: only the buffers change, not the count of tokens seen.
        """
        if keys.shape[-2] < self.cumulative_length:
            raise ValueError(f"buffers of {keys.shape[-2]} tokens cannot hold the {self.cumulative_length} written")
        self.keys, self.values = keys, values
        self.capacity, self.growable = keys.shape[-2], False
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def num_tokens_held(self) -> int:
        return self.cumulative_length

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.cumulative_length
        end = start + key_states.shape[-2]
        if end > self.capacity:
            if not self.growable:
                raise ValueError(
                    f"{end} tokens do not fit the {self.capacity}-token buffers this layer is bound to, which it does "
                    "not own and cannot grow"
                )
            self._grow(max(end, 2 * self.capacity))
        self.keys[:, :, start:end].copy_(key_states)
        self.values[:, :, start:end].copy_(value_states)
        return self.keys[:, :, :end], self.values[:, :, :end]

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the keys and values written so far."""
        end = self.cumulative_length
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _grow(self, capacity: int) -> None:
        filled = self.cumulative_length
        self.capacity = capacity
        for name in self.state_names:
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[-1]))
            new[:, :, :filled].copy_(old[:, :, :filled])
            setattr(self, name, new)

    def crop(self, tokens_to_remove: int) -> None:
        """Forgets the newest tokens: ``-n`` drops ``n`` of them, ``n > 0`` keeps the first ``n`` (Transformers'
        two conventions). The buffers stay allocated."""
        keep = self.cumulative_length + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        self.cumulative_length = max(0, min(keep, self.cumulative_length))


class FullKVCache(KVPolicyCache):
    """Every token at full precision, in buffers of ``capacity`` tokens per layer allocated up front.

    With ``dtype`` (and ``device``) the buffers are allocated at construction, so ``nbytes()`` is final before the
    first token and a decode step never allocates; otherwise at the first ``update``. ``capacity`` defaults to the
    context policy's window, the longest history a forecast conditions on; a longer stream doubles the buffers.

    ```python
    >>> cache = FullKVCache(model.config, capacity=1024, dtype=torch.float32)
    >>> cache.nbytes() == kv_cache_bytes(model.config, 1024)
    True
    ```"""

    def __init__(
        self,
        config: PreTrainedConfig,
        capacity: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 1,
        context_policy: ContextPolicy | None = None,
    ):
        config = _decoder_config(config)
        if capacity is None:
            capacity = _window(config, context_policy)
        super().__init__(layers=[FullKVLayer(capacity) for _ in range(config.num_hidden_layers)])
        if dtype is not None:
            heads, head_dim = config.num_key_value_heads, config.head_dim
            self.early_initialization(batch_size, heads, head_dim, dtype, torch.device(device))


class PrefixedLayer(CacheLayerMixin):
    """A cache layer read behind a shared prefix layer: attention sees the prefix's keys and values, then its own.

    Only the wrapped layer is written and counted in ``nbytes()``; the prefix is read by reference.
    """

    def __init__(self, prefix: FullKVLayer, layer: CacheLayerMixin):
        # No CacheLayerMixin.__init__: the wrapped layer's state is the only state.
        self.prefix, self.layer = prefix, layer

    @property
    def is_initialized(self) -> bool:
        return self.layer.is_initialized

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.layer.lazy_initialization(key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self.layer.update(key_states, value_states, *args, **kwargs)
        prefix_keys, prefix_values = (state.expand(keys.shape[0], -1, -1, -1) for state in self.prefix.filled())
        return torch.cat([prefix_keys, keys], dim=-2), torch.cat([prefix_values, values], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The prefix fills positions 0..P-1 and the wrapped layer's tokens follow at their own offset.
        kv_length, kv_offset = self.layer.get_mask_sizes(query_length)
        return kv_length + self.prefix.cumulative_length, kv_offset

    def get_seq_length(self) -> int:
        return self.prefix.cumulative_length + self.layer.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.layer.reset()

    def nbytes(self) -> int:
        return self.layer.nbytes()

    def num_tokens_held(self) -> int:
        return self.layer.num_tokens_held()


class PrefixedCache(KVPolicyCache):
    """``cache`` behind a shared ``prefix``: positions, masks and attention see prefix then cache; only ``cache`` is
    written and counted in ``nbytes()``, so N sessions behind one prefix hold one prefix plus N suffixes.

    ```python
    >>> prefix = FullKVCache(model.config, capacity=len(index_ids), dtype=torch.float32)
    >>> model(index_ids, past_key_values=prefix)
    >>> session = PrefixedCache(prefix, FullKVCache(model.config, dtype=torch.float32))
    >>> model(symbol_ids, position_ids=..., past_key_values=session)   # positions continue after the prefix
    ```"""

    def __init__(self, prefix: FullKVCache, cache: KVPolicyCache):
        if len(prefix.layers) != len(cache.layers):
            raise ValueError(f"prefix has {len(prefix.layers)} layers but the cache has {len(cache.layers)}")
        if isinstance(cache, (SinkKVCache, PrefixedCache)):
            raise ValueError(
                f"{type(cache).__name__} cannot sit behind a shared prefix: a sink cache bounds query-key distances, "
                "which a prefix at fixed positions would break"
            )
        super().__init__(layers=[PrefixedLayer(p, layer) for p, layer in zip(prefix.layers, cache.layers)])


class QuantizedKVCache(KVPolicyCache):
    """KIVI-style quantized KV cache in pure torch: int8, or int4 packed two values per byte.

    Args:
        bits (`int`): 8 or 4.
        residual_length (`int`): the newest tokens kept in full precision; keys are quantized per channel in blocks
            of this many tokens.
        value_group_size (`int`): values are quantized per token in groups of this many channels, taken across the
            KV heads of the token. Capped at ``num_key_value_heads * head_dim``.
    """

    def __init__(self, config: PreTrainedConfig, bits: int = 8, residual_length: int = 128, value_group_size: int = 64):
        config = _decoder_config(config)
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if residual_length < 1:
            raise ValueError(f"residual_length must be at least 1, got {residual_length}")
        channels = config.num_key_value_heads * config.head_dim
        value_group_size = min(value_group_size, channels)
        if value_group_size < 2 or value_group_size % 2 or channels % value_group_size:
            raise ValueError(
                f"value_group_size ({value_group_size}) must be even and divide num_key_value_heads * head_dim "
                f"({channels})"
            )
        super().__init__(
            layers=[KIVILayer(bits, residual_length, value_group_size) for _ in range(config.num_hidden_layers)]
        )


class SinkKVCache(KVPolicyCache):
    """StreamingLLM attention-sink cache: the first ``num_sink_tokens`` tokens and the newest ``window``.

    Memory is constant once ``num_sink_tokens + window`` tokens have been seen. Use the default position ids (the
    count of tokens seen, as `generate` does): RoPE scores depend only on query minus key position, so turning the
    sink keys forward by the number of evicted tokens shows every query the sinks directly before the window and
    the window at its true distances. No distance then exceeds ``num_sink_tokens + window``, however long the
    stream; by default that plus the query fills the context policy's (the checkpoint's trained) window.

    A multi-token update (a prefill, or a chunk of ticks) attends to everything kept plus the whole chunk, as the
    removed Transformers `SinkCache` did; feed one tick at a time for exact StreamingLLM behaviour.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        num_sink_tokens: int = 4,
        window: int | None = None,
        context_policy: ContextPolicy | None = None,
    ):
        config = _decoder_config(config)
        if num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be non-negative, got {num_sink_tokens}")
        if window is None:
            window = _window(config, context_policy) - 1 - num_sink_tokens
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        rotary_embedding = LlamaRotaryEmbedding(config)
        rope_type = config.rope_parameters["rope_type"]
        if "dynamic" in rope_type or rotary_embedding.attention_scaling != 1.0:
            raise ValueError(
                f"SinkKVCache re-rotates keys by position differences, which rope_type {rope_type!r} does not allow"
            )
        super().__init__(
            layers=[SinkLayer(num_sink_tokens, window, rotary_embedding) for _ in range(config.num_hidden_layers)]
        )


class SelectiveKVCache(KVPolicyCache):
    """A KV cache that never holds more than ``budget`` tokens per KV head, always keeping the sink tokens.

    Policies for the tokens beyond the sinks: ``"h2o"`` keeps the heavy hitters (the most attention received so
    far), ``"recency"`` the newest tokens, ``"hybrid"`` half of each (H2O's own recipe). Attention received is
    measured: eager attention returns the weights, and [`track_attention`] hooks the attention modules to hand them
    to the cache in use, which evicts right after each layer's attention. ``"recency"`` needs neither.

    Kept keys keep their original rotation, so a heavy hitter from far back is seen at its true distance; a stream
    therefore rebases by the context policy as the full cache does. The default budget is a quarter of its window.

    ```python
    >>> model.set_attn_implementation("eager")
    >>> track_attention(model)
    >>> cache = SelectiveKVCache(model.config, budget=512, policy="hybrid")
    >>> model.generate(input_ids, past_key_values=cache, max_new_tokens=16)
    ```"""

    def __init__(
        self,
        config: PreTrainedConfig,
        budget: int | None = None,
        policy: str = "hybrid",
        num_sink_tokens: int = 4,
        context_policy: ContextPolicy | None = None,
    ):
        config = _decoder_config(config)
        if budget is None:
            budget = _window(config, context_policy) // 4
        if policy not in SELECTIVE_POLICIES:
            raise ValueError(f"policy must be one of {SELECTIVE_POLICIES}, got {policy!r}")
        if num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be non-negative, got {num_sink_tokens}")
        if budget <= num_sink_tokens:
            raise ValueError(f"budget ({budget}) must exceed num_sink_tokens ({num_sink_tokens})")
        super().__init__(
            layers=[SelectiveLayer(budget, policy, num_sink_tokens) for _ in range(config.num_hidden_layers)]
        )


def _route_attention_weights(module: nn.Module, args, kwargs, output) -> None:
    cache = kwargs.get("past_key_values")
    if isinstance(cache, SelectiveKVCache) and cache.layers[module.layer_idx].uses_attention:
        cache.layers[module.layer_idx].observe_attention(output[1])


def track_attention(model: nn.Module) -> nn.Module:
    """Hooks every attention module of ``model`` so a [`SelectiveKVCache`] in use receives the attention weights.

    Idempotent. The hooks do nothing for other caches, so the model stays usable with any of them.
    """
    if getattr(model, "_kv_attention_tracked", False):
        return model
    attention_modules = [
        module for name, module in model.named_modules() if name.endswith("self_attn") and hasattr(module, "layer_idx")
    ]
    if not attention_modules:
        raise ValueError(f"found no `self_attn` modules with a `layer_idx` in {type(model).__name__}")
    for module in attention_modules:
        module.register_forward_hook(_route_attention_weights, with_kwargs=True)
    model._kv_attention_tracked = True
    return model


def build_cache(config: PreTrainedConfig, policy: str, /, **kwargs) -> Cache:
    """The cache for ``policy`` in ``CACHE_POLICIES``; ``kwargs`` go to its class (e.g. ``budget=512``).

    ``policy`` is positional-only, so ``build_cache(config, "selective", policy="h2o")`` picks the eviction policy.
    """
    if policy in ("int8", "int4"):
        return QuantizedKVCache(config, bits=int(policy[3:]), **kwargs)
    classes = {"full": FullKVCache, "sink": SinkKVCache, "selective": SelectiveKVCache}
    if policy not in classes:
        raise ValueError(f"policy must be one of {CACHE_POLICIES}, got {policy!r}")
    return classes[policy](config, **kwargs)


__all__ = [
    "CACHE_POLICIES",
    "SELECTIVE_POLICIES",
    "FullKVCache",
    "FullKVLayer",
    "KVPolicyCache",
    "PrefixedCache",
    "QuantizedKVCache",
    "SelectiveKVCache",
    "SinkKVCache",
    "build_cache",
    "dequantize",
    "kv_cache_bytes",
    "pack_int4",
    "quantize",
    "track_attention",
    "unpack_int4",
]
