"""Multi-head to grouped-query attention conversion by mean-pooling key/value heads (Ainslie et al., 2023).

Query heads are grouped contiguously, as ``repeat_kv`` shares them: KV head ``j`` of a model with ``G`` query heads
per KV head serves query heads ``j*G .. j*G + G - 1``, so pooling to ``K`` KV heads replaces each run of ``S / K``
source KV-head projections with their mean, and a model whose pooled heads were already identical computes exactly
what it did before. A short "uptraining" run on the original objective then recovers most of the lost quality.
"""

from __future__ import annotations

from .modeling_kvtrade import KVTradeForCausalLM


def mean_pool_kv_heads(model: KVTradeForCausalLM, num_key_value_heads: int) -> KVTradeForCausalLM:
    """A new model with ``num_key_value_heads`` KV heads, each the mean of its group's key/value projections;
    every other weight, the dtype, device and attention backend are the source's."""
    source_heads = model.config.num_key_value_heads
    if num_key_value_heads < 1 or source_heads % num_key_value_heads:
        divisors = [count for count in range(1, source_heads + 1) if source_heads % count == 0]
        raise ValueError(
            f"kv heads must divide the model's {source_heads} key/value heads "
            f"({model.config.num_attention_heads} query heads) so that every group pools the same number of heads; "
            f"got {num_key_value_heads}, choose one of {divisors}"
        )
    config = type(model.config).from_dict({**model.config.to_dict(), "num_key_value_heads": num_key_value_heads})
    config._attn_implementation = model.config._attn_implementation
    state = model.state_dict()
    for name, tensor in state.items():
        if name.rsplit(".", 2)[-2] in ("k_proj", "v_proj"):
            # Rows of a k/v projection weight are (kv head, head_dim); KVTradeConfig rejects attention biases.
            grouped = tensor.reshape(num_key_value_heads, -1, config.head_dim, tensor.shape[-1])
            state[name] = grouped.mean(dim=1).flatten(0, 1)
    converted = KVTradeForCausalLM(config).to(device=model.device, dtype=model.dtype)
    converted.load_state_dict(state)
    converted.generation_config = model.generation_config
    return converted.eval()


def uptrain(
    model: KVTradeForCausalLM,
    tokenizer,
    frames: dict,
    max_steps: int,
    batch_size: int = 8,
    learning_rate: float = 3e-4,
    seed: int = 0,
) -> list[dict]:
    """Continues training ``model`` in place on the training-period windows of ``frames``; returns the loss log.

    A constant learning rate after a short warmup (a brief run has no room for a decay schedule), no checkpoints.
    """
    import tempfile

    from .context import ContextPolicy
    from .training import make_trainer, trainer_windows

    if max_steps < 1:
        raise ValueError(f"uptraining needs at least one step, got {max_steps}")
    windows = trainer_windows(frames, tokenizer, ContextPolicy.from_config(model.config))["train"]
    with tempfile.TemporaryDirectory(prefix="kvtrade-uptrain-") as scratch:
        trainer = make_trainer(
            model, scratch, windows, max_steps=max_steps, learning_rate=learning_rate, batch_size=batch_size,
            seed=seed, use_cpu=model.device.type == "cpu", lr_scheduler_type="constant_with_warmup", warmup_steps=0.1,
            save_strategy="no", logging_steps=max(max_steps // 10, 1),
        )  # fmt: skip
        trainer.train()
    model.eval()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def convert_checkpoint(
    source: str,
    destination: str,
    num_key_value_heads: int,
    frames: dict,
    uptrain_steps: int = 0,
    **uptrain_kwargs,
) -> dict:
    """Pools ``source`` to ``num_key_value_heads`` KV heads, optionally uptrains it, and saves it to ``destination``.

    Returns the test-period next-bar NLL (nats per bar, ``hf_kvtrade.evaluation``) of the source, of the pooled
    model and, when ``uptrain_steps > 0``, of the uptrained one, pooled over every series of ``frames``.
    """
    from .evaluation import evaluate, pooled_model_nll, tokenized_series
    from .forecasting import Forecaster

    source_forecaster = Forecaster.from_pretrained(source)
    model, tokenizer = source_forecaster.model, source_forecaster.tokenizer
    converted = mean_pool_kv_heads(model, num_key_value_heads)
    baselines = evaluate(frames)
    series = tokenized_series(frames, tokenizer)
    report = {
        "source": str(source),
        "destination": str(destination),
        "source_kv_heads": model.config.num_key_value_heads,
        "kv_heads": num_key_value_heads,
        "num_attention_heads": model.config.num_attention_heads,
        "context_policy": vars(source_forecaster.context_policy),
        "series": sorted(frames),
        "num_test_bars": baselines["num_bars"],
        "baseline_nll": {name: metrics["nll"] for name, metrics in baselines["models"].items()},
        "nll": {"source": pooled_model_nll(series, model, tokenizer)},
    }
    report["nll"]["converted"] = pooled_model_nll(series, converted, tokenizer)
    if uptrain_steps:
        report["uptrain_steps"] = uptrain_steps
        report["uptrain_log"] = uptrain(converted, tokenizer, frames, uptrain_steps, **uptrain_kwargs)
        report["nll"]["uptrained"] = pooled_model_nll(series, converted, tokenizer)
    converted.save_pretrained(destination)
    return report


__all__ = ["convert_checkpoint", "mean_pool_kv_heads", "uptrain"]
