"""Multi-head to grouped-query attention conversion by mean-pooling key/value heads (Ainslie et al., 2023).

Query heads are grouped contiguously, as ``repeat_kv`` in ``modeling_kvtrade.py`` shares them: KV head ``j`` of
a model with ``G`` query heads per KV head serves query heads ``j*G .. j*G + G - 1``. Converting to ``K`` KV heads
replaces each run of ``S / K`` source KV-head projections (``S``: the source's KV heads, all query heads for MHA)
with their mean, so a model whose pooled heads were already identical computes exactly what it did before.
After pooling, a short "uptraining" run on the original objective recovers most of the lost quality; the GQA
paper uses about 5% of the pre-training compute.
"""

from __future__ import annotations

from .modeling_kvtrade import KVTradeForCausalLM

KV_PROJECTIONS = ("k_proj", "v_proj")


def check_kv_heads(config, num_key_value_heads: int) -> None:
    """Raises ValueError unless ``num_key_value_heads`` evenly pools the KV heads of ``config``."""
    source_heads = config.num_key_value_heads
    if num_key_value_heads < 1 or source_heads % num_key_value_heads:
        divisors = [count for count in range(1, source_heads + 1) if source_heads % count == 0]
        raise ValueError(
            f"kv heads must divide the model's {source_heads} key/value heads "
            f"({config.num_attention_heads} query heads) so that every group pools the same number of heads; "
            f"got {num_key_value_heads}, choose one of {divisors}"
        )


def mean_pool_kv_heads(model: KVTradeForCausalLM, num_key_value_heads: int) -> KVTradeForCausalLM:
    """A new model with ``num_key_value_heads`` KV heads, each the mean of its group's key/value projections.

    Every other weight is copied unchanged; the result has the source's dtype, device and attention backend.
    """
    check_kv_heads(model.config, num_key_value_heads)
    config = type(model.config).from_dict({**model.config.to_dict(), "num_key_value_heads": num_key_value_heads})
    config._attn_implementation = model.config._attn_implementation
    heads_per_group = model.config.num_key_value_heads // num_key_value_heads
    state = {}
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 2)[-2] in KV_PROJECTIONS:
            # Rows of a k/v projection are (kv head, head_dim); bias rows likewise, with no input dimension.
            grouped = tensor.reshape(num_key_value_heads, heads_per_group, config.head_dim, *tensor.shape[1:])
            tensor = grouped.mean(dim=1).reshape(num_key_value_heads * config.head_dim, *tensor.shape[1:])
        state[name] = tensor
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

    ``hf_kvtrade.training.train`` always starts from fresh weights, so this runs the same ``Trainer`` on the same
    ``trainer_windows`` starting from the pooled ones, with a constant learning rate after a short warmup (a
    brief run has no room for a decay schedule) and no checkpoints.
    """
    import tempfile

    from transformers import set_seed

    from .context import ContextPolicy
    from .training import make_trainer, trainer_windows

    if max_steps < 1:
        raise ValueError(f"uptraining needs at least one step, got {max_steps}")
    set_seed(seed)
    windows = trainer_windows(frames, tokenizer, ContextPolicy.from_config(model.config))["train"]
    model.train()
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
    model before uptraining and, when ``uptrain_steps > 0``, after it, pooled over every series of ``frames``.
    The baselines do not change with the model, so they are fitted and scored once.
    """
    from .evaluation import evaluate, pooled_model_nll, tokenized_series
    from .forecasting import Forecaster

    source_forecaster = Forecaster.from_pretrained(source)
    check_kv_heads(source_forecaster.model.config, num_key_value_heads)
    tokenizer = source_forecaster.tokenizer
    baselines = evaluate(frames)
    series = tokenized_series(frames, tokenizer)
    report = {
        "source": str(source),
        "destination": str(destination),
        "source_kv_heads": source_forecaster.model.config.num_key_value_heads,
        "kv_heads": num_key_value_heads,
        "num_attention_heads": source_forecaster.model.config.num_attention_heads,
        "context_policy": vars(source_forecaster.context_policy),
        "series": sorted(frames),
        "num_test_bars": baselines["num_bars"],
        "baseline_nll": {name: metrics["nll"] for name, metrics in baselines["models"].items()},
        "nll": {"source": pooled_model_nll(series, source_forecaster.model, tokenizer)},
    }
    converted = mean_pool_kv_heads(source_forecaster.model, num_key_value_heads)
    report["nll"]["converted"] = pooled_model_nll(series, converted, tokenizer)
    if uptrain_steps:
        report["uptrain_steps"] = uptrain_steps
        report["uptrain_log"] = uptrain(converted, tokenizer, frames, uptrain_steps, **uptrain_kwargs)
        report["nll"]["uptrained"] = pooled_model_nll(series, converted, tokenizer)
    Forecaster(converted, tokenizer).save_pretrained(destination)
    return report


__all__ = ["check_kv_heads", "convert_checkpoint", "mean_pool_kv_heads", "uptrain"]
