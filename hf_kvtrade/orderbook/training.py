"""Training the order-book model: a small `KVTradeForCausalLM` over tick tokens, with the project's Trainer set-up.

The capture is split by time (20 minutes train, 5 validate and pick the best weights, 5 test). Only move tokens
are scored: the covariates are given, not forecast. Validation scores each move from exactly the context the
policy gives it in serving (:func:`scoring_windows`), so the validation loss is the analyzer's own next-move loss.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

from ..context import ContextPolicy
from ..data.windows import IGNORE_INDEX, policy_windows
from .tokenizer import OrderBookTokenizer

PERIOD_MINUTES = (20, 5, 5)
SHIPPED_ORDERBOOK_CHECKPOINT = Path(str(files("hf_kvtrade.checkpoints") / "kvtrade-orderbook"))
# 128 ticks (12.8 s) per window; a rebase keeps the last 64 ticks. Both are whole ticks, so every context the
# policy gives starts on a tick's first token, as the training windows do.
WINDOW_TOKENS = 384
STRIDE_TOKENS = 192
# The `tiny` preset halved in width (two 32-wide heads, which vLLM's CPU kernels take, sharing one KV head): the
# 12,000 training ticks hold 287 moves in all, and a step of the analyzer must stay well under a millisecond.
MODEL_SHAPE = {"hidden_size": 64, "intermediate_size": 192, "num_attention_heads": 2, "num_key_value_heads": 1,
               "max_position_embeddings": WINDOW_TOKENS}  # fmt: skip


@dataclass
class OrderBookTrainingRun:
    output_dir: str
    initial_validation_loss: float
    validation_loss: float
    best_step: int
    train_seconds: float
    num_parameters: int
    num_train_windows: int


def split_by_time(frame: pd.DataFrame, minutes=PERIOD_MINUTES) -> tuple[int, int]:
    """Row indices where validation and test begin: ``minutes`` of ticks after the first tick, in that order."""
    if not frame.index.is_monotonic_increasing:
        raise ValueError("the feature frame must be sorted by tick time")
    offsets = frame.index - frame.index[0]
    bounds = [int(np.searchsorted(offsets, pd.Timedelta(minutes=sum(minutes[:k])))) for k in (1, 2)]
    if not 0 < bounds[0] < bounds[1] < len(frame):
        raise ValueError(f"the frame spans {offsets[-1]}, too short for periods of {minutes} minutes")
    return bounds[0], bounds[1]


def move_labels(ids: np.ndarray, tokenizer: OrderBookTokenizer) -> np.ndarray:
    """``ids`` with everything but known move tokens set to -100 (the covariates are inputs, not targets); the
    move bins have ids of their own, so no position arithmetic is needed."""
    return np.where((ids >= tokenizer.first_move_id) & (ids < tokenizer.first_imbalance_id), ids, IGNORE_INDEX)


def scoring_windows(ids: np.ndarray, tokenizer: OrderBookTokenizer, policy: ContextPolicy, first_tick: int, end_tick: int):
    """``(input_ids, labels)`` that score the moves of ticks ``first_tick .. end_tick - 1``, each from the context the
    policy gives the history before it (right-padded windows of ``policy.window`` tokens)."""
    step = tokenizer.tokens_per_tick
    input_ids, labels, _ = policy_windows(ids[: end_tick * step], policy, tokenizer.pad_token_id, first_tick * step)
    return input_ids, move_labels(labels, tokenizer)


def training_windows(ids: np.ndarray, tokenizer: OrderBookTokenizer, window: int, every_ticks: int):
    """Full windows of ``window`` tokens starting at every ``every_ticks``-th tick of ``ids``, moves scored."""
    windows = np.lib.stride_tricks.sliding_window_view(ids, window)[:: every_ticks * tokenizer.tokens_per_tick]
    return windows.copy(), move_labels(windows, tokenizer)


def train_orderbook_model(frame: pd.DataFrame, output_dir: str | os.PathLike, tokenizer: OrderBookTokenizer | None = None,
                          max_steps: int = 400, batch_size: int = 8, learning_rate: float = 2e-3, window_every: int = 4,
                          eval_steps: int = 50, seed: int = 0) -> OrderBookTrainingRun:  # fmt: skip
    """Trains a fresh model on the training period of ``frame`` (tick features) and saves it with its tokenizer."""
    import torch
    from datasets import Dataset
    from transformers import set_seed

    from .. import register_auto_classes
    from ..modeling_kvtrade import KVTradeForCausalLM
    from ..presets import load_preset
    from ..training import validated_trainer

    register_auto_classes()  # the saved folder then carries the model code and auto_map, as the price model does
    set_seed(seed)
    tokenizer = tokenizer or OrderBookTokenizer()
    policy = ContextPolicy(WINDOW_TOKENS, STRIDE_TOKENS)
    validation_start, test_start = split_by_time(frame)
    ids = tokenizer.encode(frame)

    def dataset(windows: tuple[np.ndarray, np.ndarray]):
        return Dataset.from_dict(dict(zip(("input_ids", "labels"), windows))).with_format("torch")

    train_ids = ids[: validation_start * tokenizer.tokens_per_tick]
    train_dataset = dataset(training_windows(train_ids, tokenizer, policy.window, window_every))
    validation_dataset = dataset(scoring_windows(ids, tokenizer, policy, validation_start, test_start))
    # The context policy travels with the weights: every path that reads the checkpoint conditions on it.
    config = load_preset("tiny", num_bins=tokenizer.num_bins, training_context_length=policy.window,
                         context_stride=policy.stride, **MODEL_SHAPE)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvtrade-orderbook-") as scratch:
        trainer = validated_trainer(
            KVTradeForCausalLM(config), scratch, train_dataset, validation_dataset, max_steps=max_steps,
            learning_rate=learning_rate, batch_size=batch_size, seed=seed, use_cpu=not torch.cuda.is_available(),
            warmup=0.05, weight_decay=0.1, eval_steps=eval_steps, logging_steps=eval_steps,
        )
        initial_loss = trainer.evaluate()["eval_loss"]
        trainer.train()
    model = trainer.model
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return OrderBookTrainingRun(
        output_dir=str(output_dir),
        initial_validation_loss=float(initial_loss),
        validation_loss=float(trainer.state.best_metric),
        best_step=int(trainer.state.best_model_checkpoint.rsplit("-", 1)[-1]),
        train_seconds=time.perf_counter() - started,
        num_parameters=model.num_parameters(),
        num_train_windows=train_dataset.num_rows,
    )


def write_model_card(output_dir: str | os.PathLike, command: str, run: dict, report_table: str) -> Path:
    """README.md of an order-book checkpoint (a `huggingface_hub.ModelCard`): data, split, command, metrics."""
    from ..training import save_model_card

    sections = [
        ("A decoder-only transformer (`KVTradeForCausalLM`, hf-kvtrade) over order-book tick tokens: each 100 ms tick "
        "of the Bitstamp BTC/USD book is three tokens (the mid's move since the tick before in 0.5 USD steps, the "
        "top-of-book depth imbalance bin, the order-flow-imbalance bin; `orderbook_tokenizer.json`), and the "
        "next-token distribution over the 17 move bins is the forecast of the next tick's mid move. Load it with "
        "`hf_kvtrade.orderbook.training.load_orderbook_model(path)`; stream it with "
        "`hf_kvtrade.orderbook.analyzer.StreamingOrderBookAnalyzer`."),
        "## Training command",
        f"```bash\n{command}\n```",
        (f"{run['num_parameters']:,} parameters, windows of {WINDOW_TOKENS} tokens ({WINDOW_TOKENS // 3} ticks), "
        f"{run['num_train_windows']:,} training windows; validation loss {run['initial_validation_loss']:.4f} -> "
        f"{run['validation_loss']:.4f} (best step {run['best_step']})."),
        "## Data",
        ("The 30-minute Bitstamp BTC/USD order-flow capture of the ob-analytics 0.1.0 wheel (2026-05-02 "
        "02:36:20-03:06:20 UTC, data GPL-2.0-or-later, not redistributed here). Split by time: the first "
        f"{PERIOD_MINUTES[0]} minutes train, the next {PERIOD_MINUTES[1]} validate, the last {PERIOD_MINUTES[2]} test."),
        "## Metrics (next-tick mid move, against baselines on the same ticks and bins)",
        report_table,
    ]
    return save_model_card(output_dir, "order-book", sections)


def load_orderbook_model(path: str | os.PathLike):
    """``(model, tokenizer)`` of an order-book checkpoint, the model in eval mode."""
    from ..checkpoint import checkpoint_dir
    from ..modeling_kvtrade import KVTradeForCausalLM

    folder = checkpoint_dir(path)
    tokenizer = OrderBookTokenizer.from_pretrained(folder)
    model = KVTradeForCausalLM.from_pretrained(folder).eval()
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{folder}: the model's vocabulary ({model.config.vocab_size}) is not the tokenizer's ({tokenizer.vocab_size})")
    return model, tokenizer


__all__ = ["SHIPPED_ORDERBOOK_CHECKPOINT", "OrderBookTrainingRun", "load_orderbook_model", "move_labels",
           "scoring_windows", "split_by_time", "train_orderbook_model", "training_windows", "write_model_card"]
