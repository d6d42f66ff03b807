"""The ``fairness`` section of `kvtrade bench serve`: is `kvtrade serve` fair under heavy load?

One-token forecasts (horizon 1 with every logprob, as ``ForecastClient.predict`` sends them) are timed one after
the other on an idle server, then while clients keep sending sampled-path requests at the server's per-request
token budget (``n x (prompt tokens + max_tokens)``, ``n`` within the sample limit): target p99 below one second.
A request just over the budget must be refused with a 400 that names the limit.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from ._common import percentile_ms

TARGET_P99_S = 1.0


def add_arguments(parser) -> None:
    from ..serving import DEFAULT_MAX_REQUEST_TOKENS

    for flag, default, text in (
        ("max-request-tokens", DEFAULT_MAX_REQUEST_TOKENS, "the token budget of the server this section starts"),
        ("heavy-clients", 2, "clients sending heavy requests"),
        ("heavy-prompt", 128, "prompt tokens of a heavy request"),
        ("heavy-steps", 128, "tokens each heavy sample generates"),
        ("light-requests", 100, "one-token requests timed per phase"),
        ("light-prompt", 256, "prompt tokens of a one-token request"),
    ):
        parser.add_argument(f"--fairness-{flag}", type=int, default=default, help=f"{text} (default: %(default)s)")


def heavy_shape(budget: int, max_samples: int, prompt_tokens: int, steps: int) -> int:
    """The largest ``n`` whose work ``n x (prompt_tokens + steps)`` fits the budget and the sample limit."""
    n = min(max_samples, budget // (prompt_tokens + steps))
    if n < 1:
        raise ValueError(f"one sample of {prompt_tokens} + {steps} tokens is already over the budget of {budget}")
    return n


def _prompt(rng, tokenizer, length: int) -> list[int]:
    return [tokenizer.bos_token_id, *rng.integers(tokenizer.first_bin_id, tokenizer.vocab_size, length - 1).tolist()]


async def measure(url: str, model: str, tokenizer, budget: int, max_samples: int, args, headers=None) -> dict:
    """The fairness scenario against the server whose ``/v1/completions`` is ``url``."""
    import httpx

    from ..client import TOKEN_ID_OUTPUT
    from ..distribution import PathSampling, next_token_kwargs

    rng = np.random.default_rng(0)
    n = heavy_shape(budget, max_samples, args.fairness_heavy_prompt, args.fairness_heavy_steps)
    light_request = {"model": model, **TOKEN_ID_OUTPUT, **next_token_kwargs(tokenizer.vocab_size)}
    heavy_request = {
        "model": model, **TOKEN_ID_OUTPUT,
        **PathSampling.for_tokenizer(tokenizer, args.fairness_heavy_steps, n).vllm_kwargs(),
    }

    def light_body() -> dict:
        return {**light_request, "prompt": _prompt(rng, tokenizer, args.fairness_light_prompt)}

    def heavy_body() -> dict:
        return {**heavy_request, "prompt": _prompt(rng, tokenizer, args.fairness_heavy_prompt)}

    async with httpx.AsyncClient(timeout=600.0, headers=headers or {}) as http:

        async def post(body: dict) -> httpx.Response:
            response = await http.post(url, json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code} from the server: {response.text[:300]}")
            return response

        async def light_phase() -> list[float]:
            seconds = []
            for _ in range(args.fairness_light_requests):
                started = time.perf_counter()
                await post(light_body())
                seconds.append(time.perf_counter() - started)
            return seconds

        await post(light_body())  # the first request of a server is not what is measured
        idle = await light_phase()

        heavy_seconds, stop = [], asyncio.Event()

        async def heavy_client():
            while not stop.is_set():
                started = time.perf_counter()
                await post(heavy_body())
                heavy_seconds.append(time.perf_counter() - started)

        heavy = [asyncio.create_task(heavy_client()) for _ in range(args.fairness_heavy_clients)]
        await asyncio.sleep(1.0)  # the heavy requests are admitted and decoding
        loaded_started = time.perf_counter()
        loaded = await light_phase()
        loaded_wall = time.perf_counter() - loaded_started
        stop.set()
        for task in heavy:
            task.cancel()  # vLLM aborts a request whose client went away
        outcomes = await asyncio.gather(*heavy, return_exceptions=True)
        failed = [outcome for outcome in outcomes if isinstance(outcome, Exception)]  # not the CancelledErrors
        if failed:
            raise failed[0]

        over = heavy_body()
        over["max_tokens"] = over["min_tokens"] = budget // n - args.fairness_heavy_prompt + 1
        refused = await http.post(url, json=over)

    p99 = percentile_ms(loaded, 99)
    return {
        "budget_tokens": budget,
        "max_samples": max_samples,
        "heavy": {
            "clients": args.fairness_heavy_clients,
            "n": n,
            "prompt_tokens": args.fairness_heavy_prompt,
            "max_tokens": args.fairness_heavy_steps,
            "work_tokens": n * (args.fairness_heavy_prompt + args.fairness_heavy_steps),
            "completed_during_the_light_phase": len(heavy_seconds),
            "median_s": float(np.median(heavy_seconds)) if heavy_seconds else None,
            "sampled_tokens_per_s": len(heavy_seconds) * n * args.fairness_heavy_steps / loaded_wall,
        },
        "light": {
            "requests": args.fairness_light_requests,
            "prompt_tokens": args.fairness_light_prompt,
            "idle_p50_ms": percentile_ms(idle, 50),
            "idle_p99_ms": percentile_ms(idle, 99),
            "loaded_p50_ms": percentile_ms(loaded, 50),
            "loaded_p99_ms": p99,
            "loaded_max_ms": 1e3 * max(loaded),
        },
        "over_budget": {
            "work_tokens": n * (args.fairness_heavy_prompt + over["max_tokens"]),
            "status": refused.status_code,
            "message": refused.json().get("error", {}).get("message", refused.text[:300]),
        },
        "target": {"p99_s_below": TARGET_P99_S, "met": p99 / 1e3 < TARGET_P99_S},
    }


def report(result: dict, machine_label: str) -> list[str]:
    heavy, light, over = result["heavy"], result["light"], result["over_budget"]
    verdict = "met" if result["target"]["met"] else "MISSED"
    return [
        (
            f"Fairness: one-token forecasts ({light['prompt_tokens']}-token prompts) p50 {light['idle_p50_ms']:.0f} ms, "
            f"p99 {light['idle_p99_ms']:.0f} ms on an idle server; p50 {light['loaded_p50_ms']:.0f} ms, p99 "
            f"{light['loaded_p99_ms']:.0f} ms (max {light['loaded_max_ms']:.0f} ms) while {heavy['clients']} clients send "
            f"sampled paths at the budget (n={heavy['n']}, {heavy['prompt_tokens']}-token prompts, {heavy['max_tokens']} "
            f"steps: {heavy['work_tokens']} of {result['budget_tokens']} tokens; {heavy['completed_during_the_light_phase']} "
            f"finished, {heavy['sampled_tokens_per_s']:.0f} sampled tokens/s)."
        ),
        f"  target p99 < {TARGET_P99_S:.0f} s under load: {verdict} (on {machine_label})",
        f"  a request of {over['work_tokens']} tokens, over the budget: HTTP {over['status']}: {over['message']}",
    ]
