"""Prefix-cache hit ratios of a stream of prompts: what was measured, and what a whole-block cache can serve at best.

vLLM caches whole KV blocks (32 tokens on the CPU backend), chained from the first token of a prompt, and always
recomputes at least the last prompt token (it needs its logits), so a request of ``L`` prompt tokens can hit at
most ``floor((L - 1) / 32) * 32`` of them. Two ratios are reported over a run:

- ``hit_ratio``: cached tokens / prompt tokens, everything counted;
- ``full_block_hit_ratio``: cached tokens / tokens in full blocks (``floor(L / 32) * 32`` per request), the part
  of each prompt a block cache can hold at all: the last partial block is never cached, by design.

``ideal_cached_tokens`` replays a stream against an unbounded whole-block cache with vLLM's rule, so a measured
run can be compared with the best any block cache could do on the same prompts.

This module imports neither torch nor vLLM: ``kvtrade bench serve`` reports these numbers, the tests check them.
"""

from __future__ import annotations

from collections.abc import Sequence

BLOCK_SIZE = 32


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

    A block hits when the block and every block before it in the prompt were in some earlier prompt at the same
    place (vLLM chains block hashes from the start); a request hits at most its first ``L - 1`` tokens; after a
    request, every full block of its prompt is cached.
    """
    cached_blocks: set[int] = set()
    hits = []
    for prompt in prompts:
        prompt = list(prompt)
        keys, key = [], 0
        for index in range(len(prompt) // block_size):
            key = hash((key, tuple(prompt[index * block_size : (index + 1) * block_size])))
            keys.append(key)
        hit = 0
        for key in keys[: (len(prompt) - 1) // block_size]:
            if key not in cached_blocks:
                break
            hit += block_size
        hits.append(hit)
        cached_blocks.update(keys)
    return hits


__all__ = ["BLOCK_SIZE", "full_block_tokens", "hit_ratios", "ideal_cached_tokens"]
