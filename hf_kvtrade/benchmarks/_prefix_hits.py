"""Prefix-cache hit ratios of a stream of prompts: what was measured, and what a whole-block cache can serve at best.

vLLM caches whole KV blocks, chained from the first token of a prompt, and always recomputes at least the last
prompt token (it needs its logits), so a request of ``L`` prompt tokens can hit at most ``floor((L - 1) / block)``
blocks. ``hit_ratio`` counts cached tokens over all prompt tokens; ``full_block_hit_ratio`` over the tokens in full
blocks, the part of a prompt a block cache can hold at all (the last partial block is never cached, by design).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..serving import CPU_BLOCK_SIZE as BLOCK_SIZE


def full_block_tokens(prompt_length: int, block_size: int = BLOCK_SIZE) -> int:
    """Tokens of a ``prompt_length``-token prompt that lie in full blocks."""
    return prompt_length // block_size * block_size


def hit_ratios(prompt_lengths: Sequence[int], cached_tokens: Sequence[int], block_size: int = BLOCK_SIZE) -> dict:
    """Totals and both hit ratios of a run of requests (one prompt length and one cached count per request)."""
    if len(prompt_lengths) != len(cached_tokens):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths but {len(cached_tokens)} cached counts")
    if not prompt_lengths:
        raise ValueError("no requests to count")
    prompt_total = int(sum(prompt_lengths))
    full_total = int(sum(full_block_tokens(length, block_size) for length in prompt_lengths))
    cached_total = int(sum(cached_tokens))
    return {
        "requests": len(prompt_lengths),
        "prompt_tokens": prompt_total,
        "full_block_tokens": full_total,
        "cached_tokens": cached_total,
        "hit_ratio": cached_total / prompt_total,
        "full_block_hit_ratio": cached_total / full_total if full_total else 0.0,
    }


def ideal_cached_tokens(prompts: Sequence[Sequence[int]], block_size: int = BLOCK_SIZE) -> list[int]:
    """Cached tokens per request if the prompts ran in order against an unbounded whole-block prefix cache.

    A block hits when it and every block before it were in an earlier prompt at the same place (vLLM chains block
    hashes from the start), within the first ``L - 1`` tokens; after a request every full block of it is cached.
    """
    cached_blocks: set[int] = set()
    hits = []
    for prompt in prompts:
        starts = range(0, full_block_tokens(len(prompt), block_size), block_size)
        blocks = (tuple(prompt[start : start + block_size]) for start in starts)
        keys = list(itertools.accumulate(blocks, lambda key, block: hash((key, block)), initial=0))[1:]
        hittable = keys[: (len(prompt) - 1) // block_size]
        hits.append(block_size * len(list(itertools.takewhile(cached_blocks.__contains__, hittable))))
        cached_blocks.update(keys)
    return hits
