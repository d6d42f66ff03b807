"""Checkpoint loading, the one way: a folder that holds a KVTrade model, or a clear error naming the path.

The shipped model is package data (the repository's top-level ``checkpoints/``, installed as
``hf_kvtrade.checkpoints``), so it loads the same from a clone, an editable install or a wheel.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from importlib.resources import files
from pathlib import Path

SHIPPED_CHECKPOINT = Path(str(files("hf_kvtrade.checkpoints") / "kvtrade-small"))
# The package modules that a checkpoint folder carries for `trust_remote_code` (AutoConfig / AutoModel).
REMOTE_CODE_MODULES = ("configuration_kvtrade.py", "modeling_kvtrade.py")


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """``path`` as a checkpoint folder, or ``FileNotFoundError`` saying what is missing there."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}: no such folder")
    missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}: the folder has no {' or '.join(missing)}")
    return folder


def load_checkpoint(path: str | os.PathLike, **model_kwargs):
    """``(model, tokenizer)`` of the checkpoint at ``path``, the model in eval mode."""
    from .modeling_kvtrade import KVTradeForCausalLM
    from .tokenization_kvtrade import ReturnTokenizer

    folder = checkpoint_dir(path)
    model = KVTradeForCausalLM.from_pretrained(folder, **model_kwargs).eval()
    return model, ReturnTokenizer.from_config(model.config)


def stale_remote_code(path: str | os.PathLike) -> list[str]:
    """The remote-code files of the checkpoint that differ from (or are missing beside) the package's own."""
    package = Path(__file__).parent
    folder = checkpoint_dir(path)
    return [
        name
        for name in REMOTE_CODE_MODULES
        if not (folder / name).is_file() or not filecmp.cmp(package / name, folder / name, shallow=False)
    ]


def refresh_remote_code(path: str | os.PathLike) -> list[str]:
    """Copies the package's model code into the checkpoint where it differs; returns the names it rewrote."""
    stale = stale_remote_code(path)
    for name in stale:
        shutil.copyfile(Path(__file__).parent / name, Path(path) / name)
    return stale


__all__ = ["REMOTE_CODE_MODULES", "SHIPPED_CHECKPOINT", "checkpoint_dir", "load_checkpoint", "refresh_remote_code", "stale_remote_code"]
