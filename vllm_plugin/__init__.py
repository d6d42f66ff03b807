"""vLLM plugin for KVTrade (filled in by the vLLM issue)."""
