"""Prices in, forecast out through vLLM: over HTTP (`ForecastClient`) or in-process (`OfflineForecaster`).

Both follow `BaseForecaster`, as the Transformers `Forecaster` does: same prompts, same `Forecast`. Horizon 1 reads
the logprobs of every token in the vocabulary (the server allows that many, see `hf_kvtrade.serving`), so it is
exact, not a top-k truncation.
"""

from __future__ import annotations

import os

import numpy as np

from .context import ContextPolicy
from .distribution import BaseForecaster, PathSampling, next_token_kwargs
from .serving import DEFAULT_MAX_REQUEST_TOKENS, engine_settings
from .tokenization_kvtrade import ReturnTokenizer

# Answers in token ids, not text: the return tokens have no text, and the client reads ids back.
TOKEN_ID_OUTPUT = {"return_token_ids": True, "return_tokens_as_token_ids": True}


class _VLLMForecasting(BaseForecaster):
    """What both vLLM paths share: the checkpoint's tokenizer and policy, and token probabilities from logprobs."""

    def __init__(self, checkpoint: str | os.PathLike):
        self.tokenizer = ReturnTokenizer.from_pretrained(checkpoint)
        self.context_policy = ContextPolicy.from_pretrained(checkpoint)

    def _check_max_model_len(self, max_model_len: int, where: str) -> None:
        if max_model_len != self.context_policy.window:
            raise ValueError(
                f"{where} runs with max_model_len {max_model_len}, but the checkpoint's context policy has a "
                f"{self.context_policy.window}-token window: serve it with `kvtrade serve`, which sets it"
            )

    def _token_probs(self, ids, logprobs) -> np.ndarray:
        probs = np.zeros(self.tokenizer.vocab_size)
        probs[np.fromiter(ids, dtype=np.int64)] = np.exp(np.fromiter(logprobs, dtype=np.float64))
        return probs


class ForecastClient(_VLLMForecasting):
    """Forecasts from a running `kvtrade serve` server over its OpenAI-compatible `/v1/completions`.

    >>> client = ForecastClient("http://127.0.0.1:8000/v1", checkpoint)
    >>> client.predict(prices, horizon=1).prob_up

    ``checkpoint`` is the served checkpoint's folder (only its JSON is read). ``model`` defaults to the one model
    the server serves. Work ``n x (prompt tokens + max_tokens)`` beyond ``max_request_tokens``, the server's budget
    (`kvtrade serve --max-request-tokens`), goes out as several requests in turn; request ``j`` of a seeded call
    uses ``seed + j``.
    """

    def __init__(
        self,
        base_url: str,
        checkpoint: str | os.PathLike,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 120.0,
        max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS,
    ):
        from openai import OpenAI

        # The openai client insists on a key; a server started without --api-key ignores it.
        self.openai = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)
        served = {entry.id: entry for entry in self.openai.models.list().data}
        self.model = model or next(iter(served))
        if self.model not in served:
            raise ValueError(f"the server at {base_url} serves {sorted(served)}, not {self.model!r}")
        super().__init__(checkpoint)
        self._check_max_model_len(served[self.model].model_extra["max_model_len"], f"the server at {base_url}")
        if max_request_tokens < self.context_policy.window:
            raise ValueError(
                f"max_request_tokens ({max_request_tokens}) must hold one prompt of the {self.context_policy.window}"
                "-token window and its forecast"
            )
        self.max_request_tokens = max_request_tokens

    def complete(self, prompts: list[list[int]], **params):
        """One `/v1/completions` call for a batch of token-id prompts; results come back as token ids."""
        extra_body = {**TOKEN_ID_OUTPUT, **params.pop("extra_body", {})}
        return self.openai.completions.create(model=self.model, prompt=prompts, extra_body=extra_body, **params)

    def _within_budget(self, prompts: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
        """``prompts`` in consecutive groups whose work ``sum(len(prompt) + max_tokens)`` fits the server's budget."""
        groups, work = [[]], 0
        for prompt in prompts:
            if groups[-1] and work + len(prompt) + max_tokens > self.max_request_tokens:
                groups.append([])
                work = 0
            groups[-1].append(prompt)
            work += len(prompt) + max_tokens
        return groups

    def next_token_probs(self, prompts):
        return np.concatenate([self._next_token_probs(group) for group in self._within_budget(prompts, 1)])

    def _next_token_probs(self, prompts):
        response = self.complete(prompts, **next_token_kwargs(self.tokenizer.vocab_size))
        tops = [choice.logprobs.top_logprobs[0] for choice in sorted(response.choices, key=lambda c: c.index)]
        return np.stack([self.probs_from_top_logprobs(top) for top in tops])

    def probs_from_top_logprobs(self, top: dict[str, float]) -> np.ndarray:
        """Token probabilities from one position's ``top_logprobs`` as the server returns them."""
        # With return_tokens_as_token_ids the keys read "token_id:<id>".
        return self._token_probs((int(key.rsplit(":", 1)[1]) for key in top), top.values())

    def sample_paths(self, prompts, horizon, num_samples, seed=None):
        if num_samples * sum(len(prompt) + horizon for prompt in prompts) <= self.max_request_tokens:
            return self._sample_paths(prompts, horizon, num_samples, seed)
        paths = []
        for prompt in prompts:
            per_request = self.max_request_tokens // (len(prompt) + horizon)
            chunks = []
            for index, start in enumerate(range(0, num_samples, per_request)):
                size, chunk_seed = min(per_request, num_samples - start), None if seed is None else seed + index
                chunks.append(self._sample_paths([prompt], horizon, size, chunk_seed)[0])
            paths.append(np.concatenate(chunks))
        return np.stack(paths)

    def _sample_paths(self, prompts, horizon, num_samples, seed):
        sampling = PathSampling.for_tokenizer(self.tokenizer, horizon, num_samples, seed)
        response = self.complete(prompts, extra_body=sampling.vllm_kwargs())
        # Choices of prompt i are indices i * n .. i * n + n - 1.
        choices = sorted(response.choices, key=lambda choice: choice.index)
        ids = np.array([choice.token_ids for choice in choices], dtype=np.int64)
        return ids.reshape(len(prompts), num_samples, horizon)


class OfflineForecaster(_VLLMForecasting):
    """Forecasts with an in-process `vllm.LLM`, for batch jobs over many series.

    ``llm_kwargs`` override the settings `kvtrade serve` uses (e.g. ``enforce_eager=True``). The CPU platform
    spawns the engine, so scripts that use this need an ``if __name__ == "__main__":`` guard.
    """

    def __init__(self, checkpoint: str | os.PathLike, **llm_kwargs):
        from vllm import LLM

        super().__init__(checkpoint)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.llm = LLM(model=str(checkpoint), **{**engine_settings(checkpoint), **llm_kwargs})
        self._check_max_model_len(self.llm.llm_engine.model_config.max_model_len, "this engine")

    def generate(self, prompts: list[list[int]], sampling_params):
        from vllm.inputs import TokensPrompt

        return self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt) for prompt in prompts], sampling_params, use_tqdm=False
        )

    def next_token_probs(self, prompts):
        from vllm import SamplingParams

        outputs = self.generate(prompts, SamplingParams(**next_token_kwargs(self.tokenizer.vocab_size)))
        tops = [output.outputs[0].logprobs[0] for output in outputs]
        return np.stack([self._token_probs(top.keys(), (entry.logprob for entry in top.values())) for top in tops])

    def sample_paths(self, prompts, horizon, num_samples, seed=None):
        from vllm import SamplingParams

        sampling = PathSampling.for_tokenizer(self.tokenizer, horizon, num_samples, seed)
        outputs = self.generate(prompts, SamplingParams(**sampling.vllm_kwargs()))
        return np.array([[sample.token_ids for sample in output.outputs] for output in outputs], dtype=np.int64)


__all__ = ["TOKEN_ID_OUTPUT", "ForecastClient", "OfflineForecaster"]
