"""Model presets from `configs/*.json`, each in MHA, GQA or MQA flavour."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from .configuration_kvtrade import KVTradeConfig

# Package data: the repository's top-level configs/, installed as hf_kvtrade.configs.
CONFIG_DIR = Path(str(files("hf_kvtrade.configs")))
ATTENTION_FLAVOURS = ("mha", "gqa", "mqa")


def available_presets() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_preset(name: str, attention: str = "gqa", kv_heads: int | None = None, **overrides) -> KVTradeConfig:
    """The config of preset ``name`` (``tiny``, ``small``, ``base`` or a JSON path) in the ``attention`` flavour:
    ``mha`` (one KV head per query head), ``gqa`` (the preset's KV heads) or ``mqa`` (one); ``kv_heads`` overrides."""
    path = Path(name) if name.endswith(".json") else CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"unknown preset {name!r}: choose one of {available_presets()} or a path to a JSON file")
    if attention not in ATTENTION_FLAVOURS:
        raise ValueError(f"attention must be one of {ATTENTION_FLAVOURS}, got {attention!r}")
    settings = {key: value for key, value in json.loads(path.read_text()).items() if not key.startswith("_")}
    settings.update(overrides)
    if kv_heads is None and attention != "gqa":
        kv_heads = settings["num_attention_heads"] if attention == "mha" else 1
    if kv_heads is not None:
        settings["num_key_value_heads"] = kv_heads
    return KVTradeConfig(**settings)


__all__ = ["ATTENTION_FLAVOURS", "available_presets", "load_preset"]
