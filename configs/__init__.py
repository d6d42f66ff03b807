"""Model presets (``tiny``, ``small``, ``base``), installed as package data ``hf_kvtrade.configs``."""
