"""The order-book checkpoint through vLLM: the same next-token distribution as Transformers, and prefix-cache hits
when a prompt grows by a tick (the tokenizer is prefix-stable)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_kvtrade.orderbook.training import load_orderbook_model

pytestmark = pytest.mark.slow

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "kvtrade-orderbook"


def test_vllm_matches_transformers_and_hits_the_prefix_cache():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from hf_kvtrade.serving import engine_settings

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model, tokenizer = load_orderbook_model(CHECKPOINT)
    rng = np.random.default_rng(0)
    mid = 78_000 + 0.5 * np.cumsum(rng.choice([-1, 0, 0, 0, 0, 0, 0, 1], 110))
    ids = tokenizer.encode_ticks(mid, rng.uniform(-1, 1, 110), rng.normal(0, 0.2, 110)).tolist()
    llm = LLM(model=str(CHECKPOINT), enforce_eager=True, **engine_settings(CHECKPOINT))
    try:
        for length in (300, 303):  # a history, then the same history one tick later
            output = llm.generate([TokensPrompt(prompt_token_ids=ids[:length])],
                                  SamplingParams(max_tokens=1, logprobs=tokenizer.vocab_size), use_tqdm=False)[0]  # fmt: skip
            by_id = output.outputs[0].logprobs[0]
            vllm_logprobs = np.array([by_id[token].logprob for token in range(tokenizer.vocab_size)])
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ids[:length]])).logits[0, -1]
            np.testing.assert_allclose(vllm_logprobs, torch.log_softmax(logits, -1).numpy(), atol=1e-5, rtol=0)
        assert output.num_cached_tokens == 288  # the nine whole 32-token blocks of the shared 300 tokens
    finally:
        llm.llm_engine.engine_core.shutdown()
