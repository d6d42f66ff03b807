"""Checkpoints shipped with hf-kvtrade, installed as package data ``hf_kvtrade.checkpoints``."""
