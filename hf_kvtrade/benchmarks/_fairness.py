"""Fairness of `kvtrade serve` under heavy load: the ``fairness`` section of `kvtrade bench serve`.

One-token forecasts (horizon 1 with every logprob, as ``ForecastClient.predict`` sends them) are timed one after
the other, first on an idle server, then while ``heavy_clients`` clients keep sending sampled-path requests as large
as the server's per-request token budget allows (``n x (prompt tokens + max_tokens)`` at the budget, ``n`` within
the sample limit). The target is a p99 below one second under that load. A request just over the budget is sent
too, and must be refused with a 400 that names the limit.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

TARGET_P99_S = 1.0


def add_arguments(parser) -> None:
    from ..serving import DEFAULT_MAX_REQUEST_TOKENS

    parser.add_argument(
        "--fairness-max-request-tokens", type=int, default=DEFAULT_MAX_REQUEST_TOKENS,
        help="the token budget of the server this section starts (default: kvtrade serve's, %(default)s)",
    )  # fmt: skip
    parser.add_argument("--fairness-heavy-clients", type=int, default=2, help="clients sending heavy requests")
    parser.add_argument(
        "--fairness-heavy-prompt", type=int, default=128, help="prompt tokens of a heavy request (default: %(default)s)"
    )
    parser.add_argument(
        "--fairness-heavy-steps", type=int, default=128, help="tokens each heavy sample generates (default: %(default)s)"
    )
    parser.add_argument("--fairness-light-requests", type=int, default=100, help="one-token requests timed per phase")
    parser.add_argument("--fairness-light-prompt", type=int, default=256, help="prompt tokens of a one-token request")


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

    from ._common import percentile_ms

    rng = np.random.default_rng(0)
    bins = list(range(tokenizer.first_bin_id, tokenizer.vocab_size))
    n = heavy_shape(budget, max_samples, args.fairness_heavy_prompt, args.fairness_heavy_steps)

    def light_body() -> dict:
        return {
            "model": model, "prompt": _prompt(rng, tokenizer, args.fairness_light_prompt), "max_tokens": 1,
            "logprobs": tokenizer.vocab_size, "return_tokens_as_token_ids": True,
        }  # fmt: skip

    def heavy_body(samples: int) -> dict:
        return {
            "model": model, "prompt": _prompt(rng, tokenizer, args.fairness_heavy_prompt), "n": samples,
            "max_tokens": args.fairness_heavy_steps, "min_tokens": args.fairness_heavy_steps, "temperature": 1.0,
            "top_k": -1, "allowed_token_ids": bins, "return_token_ids": True,
        }  # fmt: skip

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

        heavy_done, heavy_seconds, stop = [], [], asyncio.Event()

        async def heavy_client():
            while not stop.is_set():
                started = time.perf_counter()
                await post(heavy_body(n))
                heavy_seconds.append(time.perf_counter() - started)
                heavy_done.append(n * args.fairness_heavy_steps)

        heavy = [asyncio.create_task(heavy_client()) for _ in range(args.fairness_heavy_clients)]
        await asyncio.sleep(1.0)  # the heavy requests are admitted and decoding
        loaded_started = time.perf_counter()
        loaded = await light_phase()
        loaded_wall = time.perf_counter() - loaded_started
        stop.set()
        failed = [task for task in heavy if task.done() and task.exception() is not None]
        for task in heavy:
            task.cancel()  # vLLM aborts a request whose client went away
        await asyncio.gather(*heavy, return_exceptions=True)
        if failed:
            raise failed[0].exception()

        over = heavy_body(n)
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
            "sampled_tokens_per_s": sum(heavy_done) / loaded_wall,
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
