"""vLLM vs Transformers on the same context windows: throughput, latency under concurrent load, prefix-cache hits.

One run, one machine, every comparison side by side:

(a) ``throughput``: forecasts per second for SYMBOLS price histories, Transformers ``Forecaster`` (one symbol at a
    time, as its API works) against vLLM's offline engine through ``OfflineForecaster`` (all symbols in one batch),
    for sampled paths (PATHS x STEPS) and for exact horizon-1 forecasts (the whole next-bar distribution). Both
    sides condition on the checkpoint's ``ContextPolicy`` windows: the prompts are asserted identical. vLLM's prefix
    cache is reset before every timed batch, so it prefills as much as Transformers does. Horizon 1 is also timed
    with vLLM's flat logprobs and with no logprobs at all, which splits its cost into model and output path.
(b) ``load``: p50/p99 latency and throughput with 64 and 256 concurrent clients (``--concurrency``), each sending
    ROUNDS requests one after the other (a new bar each round), against a real ``kvtrade serve`` server and against
    the HTTP server a user would write around ``Forecaster.predict`` (``_naive_server``, measured threaded and
    serialized), all started here on 127.0.0.1 and stopped at the end.
(c) ``prefix``: the prefix-cache hit ratio of a live stream past the context window: one horizon-1 forecast per
    bar of a real series (``--stream-series``, ``--stream-bars``), through the server (``usage.prompt_tokens_details
    .cached_tokens``) and through the offline engine (``RequestOutput.num_cached_tokens``), with the policy's
    prompts; and the latency of a new-bar request with its history cached against a reset cache.
(d) ``fairness``: p99 latency of one-token forecasts while heavy sampled-path requests, each at the server's
    per-request token budget, run concurrently against the real `kvtrade serve` (target: below 1 s), and a request
    over the budget refused (``_fairness``).

Price histories in (a) and (b) are seeded geometric random walks (cost does not depend on the prices), of
lengths spread over one rebase stride so that the windows cover every context length the policy produces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

from ..checkpoint import SHIPPED_CHECKPOINT
from . import _fairness
from ._common import context_list

SECTIONS = ("throughput", "load", "prefix", "fairness")
QUICK = {"symbols": 8, "stream_bars": 400, "concurrency": (8, 32), "rounds": 1}
DEFAULT_JSON = "out/bench/serve.json"
QUANTILES = (0.05, 0.5, 0.95)
STARTUP_TIMEOUT_S = 600


def add_arguments(parser) -> None:
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the results (default: %(default)s)")
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="model folder (default: the shipped one)")
    parser.add_argument("--symbols", type=int, default=64, help="price histories in the throughput batch")
    parser.add_argument("--bars", type=int, default=2048, help="shortest history, in bars (default: %(default)s)")
    parser.add_argument("--paths", type=int, default=16, help="sampled paths per forecast (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="sampled forecast horizon in bars (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per side; the median is reported")
    parser.add_argument(
        "--concurrency", type=context_list, default=(64, 256), help="concurrent clients, comma-separated (default: 64,256)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="requests per client in the load test (default: %(default)s)")
    parser.add_argument(
        "--load-kinds", nargs="+", choices=("h1", "paths"), default=["h1", "paths"],
        help="load-test requests: exact horizon-1 forecasts, sampled paths, or both (default: both)",
    )  # fmt: skip
    parser.add_argument("--level-timeout", type=float, default=300.0, help="seconds a load level may take before it is cut")
    parser.add_argument(
        "--naive", choices=("threaded", "serialized", "both"), default="both",
        help="the naive server runs each connection's forecast at once (threaded), one at a time (serialized), "
        "or both are measured (the default)",
    )  # fmt: skip
    parser.add_argument("--stream-series", default="sp500", help="bundled series streamed for the hit ratio")
    parser.add_argument("--stream-bars", type=int, default=2000, help="bars streamed, one request each")
    parser.add_argument("--ticks", type=int, default=8, help="new-bar requests timed, warm and cold each")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these parts")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"{QUICK['symbols']} symbols, {QUICK['stream_bars']} streamed bars, concurrency "
        f"{','.join(map(str, QUICK['concurrency']))}, {QUICK['rounds']} round",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (slower start)")
    _fairness.add_arguments(parser)


# ----------------------------------------------------------------------------------------------------- prompts
def random_histories(count: int, bars: int, stride: int, seed: int) -> list:
    """``count`` seeded random-walk price series of ``bars`` to ``bars + stride - 1`` bars, spread evenly."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = [bars + index * stride // count for index in range(count)]
    return [100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, length))) for length in lengths]


def matched_prompts(hf, vllm_side, histories, horizon: int) -> list[list[int]]:
    """The context windows both sides condition on, asserted identical token for token.

    ``hf`` is a Transformers ``Forecaster``, ``vllm_side`` an ``OfflineForecaster`` or ``ForecastClient``: each
    builds its prompt with its own ``encode_context``.
    """
    prompts = []
    for index, prices in enumerate(histories):
        hf_ids = hf.encode_context(prices, horizon)[0].tolist()
        vllm_ids = list(vllm_side.encode_context(prices, horizon))
        if hf_ids != vllm_ids:
            raise AssertionError(
                f"history {index} ({len(prices)} bars, horizon {horizon}): Transformers conditions on "
                f"{len(hf_ids)} tokens, vLLM on {len(vllm_ids)}: the two sides do not use the same window"
            )
        prompts.append(vllm_ids)
    return prompts


# ------------------------------------------------------------------------------------------------------- run
def run(args) -> int:
    # The vLLM engine runs in a spawned process; `kvtrade` is a console script, so the spawn guard holds.
    from ._common import machine_info, write_json

    if args.quick:
        args.symbols, args.stream_bars = QUICK["symbols"], min(args.stream_bars, QUICK["stream_bars"])
        args.concurrency, args.rounds = QUICK["concurrency"], QUICK["rounds"]
    from ..checkpoint import checkpoint_dir

    checkpoint = checkpoint_dir(args.checkpoint)
    sections = [name for name in SECTIONS if name in args.sections]
    payload: dict = {"setup": _setup(args, checkpoint, sections)}
    started = time.perf_counter()
    if "throughput" in sections or "prefix" in sections:
        payload.update(_offline_sections(args, checkpoint, sections))
    payload["setup"]["load_average"]["before_server"] = list(os.getloadavg())
    if {"load", "prefix", "fairness"} & set(sections):
        for key, value in _server_sections(args, checkpoint, sections).items():
            payload.setdefault(key, {}).update(value)
    if "load" in sections:
        for serialize in {"threaded": [False], "serialized": [True], "both": [True, False]}[args.naive]:
            payload["setup"]["load_average"][f"before_naive{'_serialized' * serialize}"] = list(os.getloadavg())
            name = "transformers_naive_serialized" if serialize else "transformers_naive"
            payload["load"][name] = _naive_load(args, checkpoint, serialize)
        payload["load"]["ratios"] = _load_ratios(payload["load"])
    payload["explanation"] = explain(payload)
    payload["setup"]["wall_s"] = round(time.perf_counter() - started, 1)
    payload["machine"] = machine_info()
    write_json(args.json, payload)
    print("\n" + summary(payload) + f"\nwrote {args.json}", flush=True)
    return 0


def _setup(args, checkpoint, sections) -> dict:
    from ..context import ContextPolicy

    policy = ContextPolicy.from_pretrained(checkpoint)
    return {
        "model": str(checkpoint),
        "sections": sections,
        "policy": {"window": policy.window, "stride": policy.stride},
        "symbols": args.symbols,
        "bars": f"{args.bars} to {args.bars + policy.stride - 1}",
        "paths": args.paths,
        "steps": args.steps,
        "repeats": args.repeats,
        "concurrency": list(args.concurrency),
        "rounds": args.rounds,
        "load_kinds": list(args.load_kinds),
        "naive": args.naive,
        "load_average": {"start": list(os.getloadavg())},
        "stream": {"series": args.stream_series, "bars": args.stream_bars},
        "vllm_compiled": args.compile,
        "quick": args.quick,
        "latency_statistic": "median of repeats for throughput; p50/p99 over requests under load",
    }


# ---------------------------------------------------------------------------------------- (a) offline engine
def _offline_sections(args, checkpoint: Path, sections) -> dict:
    import torch

    from ..client import OfflineForecaster
    from ..context import ContextPolicy
    from ..forecasting import Forecaster

    policy = ContextPolicy.from_pretrained(checkpoint)
    hf = Forecaster.from_pretrained(checkpoint)
    print("starting the offline vLLM engine", flush=True)
    vllm = OfflineForecaster(checkpoint, enforce_eager=not args.compile)
    results = {}
    try:
        if "throughput" in sections:
            with torch.inference_mode():
                results.update(_throughput(args, hf, vllm, policy))
            results["prefix"] = _new_bar_latencies(vllm, random_histories(1, args.bars, 1, seed=99)[0], policy, args.ticks)
        if "prefix" in sections:
            results["prefix_hits"] = {"offline": _offline_stream(args, hf, vllm)}
    finally:
        vllm.llm.llm_engine.engine_core.shutdown()
    return results


def _throughput(args, hf, vllm, policy) -> dict:
    import numpy as np
    from vllm import SamplingParams

    from ..distribution import Forecast

    histories = random_histories(args.symbols, args.bars, policy.stride, seed=0)
    matched_prompts(hf, vllm, histories, args.steps)  # raises unless both sides read the same windows
    h1_prompts = matched_prompts(hf, vllm, histories, 1)
    vocab = hf.tokenizer.vocab_size

    def hf_paths():
        for prices in histories:
            paths = hf.sample_paths([hf.encode_context(prices, args.steps)], args.steps, args.paths)[0]
            Forecast.from_paths(hf.tokenizer.decode(paths), prices[-1], QUANTILES)

    def vllm_paths():
        vllm.predict_batch(histories, args.steps, args.paths, quantiles=QUANTILES)

    def hf_h1():
        for prices in histories:
            hf.predict(prices, horizon=1, quantiles=QUANTILES)

    def vllm_h1():
        vllm.predict_batch(histories, 1, quantiles=QUANTILES)

    def vllm_h1_flat():
        probs = flat_next_token_probs(vllm, h1_prompts)
        _forecasts_from_probs(hf, probs, histories)

    def vllm_h1_bare():  # the model and scheduler alone: one token, no distribution returned (not a forecast)
        vllm.generate(h1_prompts, SamplingParams(max_tokens=1))

    # The flat path must give exactly the probabilities the client's path gives.
    exact = np.array_equal(flat_next_token_probs(vllm, h1_prompts[:4]), vllm.next_token_probs(h1_prompts[:4]))
    if not exact:
        raise AssertionError("flat logprobs differ from the client's logprobs: the cheaper path is not exact")
    candidates = {
        "hf_paths": hf_paths, "vllm_paths": vllm_paths,
        "hf_h1": hf_h1, "vllm_h1": vllm_h1, "vllm_h1_flat": vllm_h1_flat, "vllm_h1_no_logprobs": vllm_h1_bare,
    }  # fmt: skip
    print("warming up", flush=True)
    for _ in range(2):
        hf.predict(histories[0], horizon=args.steps, num_samples=args.paths)
        hf.predict(histories[0], horizon=1)
        vllm.predict_batch(histories[:2], horizon=args.steps, num_samples=args.paths)
        vllm.predict_batch(histories[:2], horizon=1)
    seconds = {name: [] for name in candidates}
    for repeat in range(args.repeats):
        # Alternate the order, so a slow moment of a shared machine does not always fall on the same side.
        for name in (candidates if repeat % 2 == 0 else reversed(list(candidates))):
            if name.startswith("vllm"):
                vllm.llm.reset_prefix_cache()  # prefill everything, as Transformers does
            start = time.perf_counter()
            candidates[name]()
            seconds[name].append(time.perf_counter() - start)
            print(f"  repeat {repeat + 1}/{args.repeats} {name:22s} {seconds[name][-1]:6.2f} s", flush=True)
    median = {name: float(np.median(values)) for name, values in seconds.items()}
    rate = {name: args.symbols / value for name, value in median.items()}
    lengths = [len(prompt) for prompt in h1_prompts]
    return {
        "throughput": {
            "kind": f"{args.paths} sampled paths x {args.steps} steps per forecast",
            "hf_forecasts_per_s": rate["hf_paths"],
            "vllm_forecasts_per_s": rate["vllm_paths"],
            "ratio": rate["vllm_paths"] / rate["hf_paths"],
            "seconds": {"hf": seconds["hf_paths"], "vllm": seconds["vllm_paths"]},
        },
        "horizon1": {
            "kind": f"exact next-bar distribution ({vocab} logprobs per forecast)",
            "hf_forecasts_per_s": rate["hf_h1"],
            "vllm_forecasts_per_s": rate["vllm_h1"],
            "ratio": rate["vllm_h1"] / rate["hf_h1"],
            "vllm_flat_logprobs_per_s": rate["vllm_h1_flat"],
            "flat_ratio": rate["vllm_h1_flat"] / rate["hf_h1"],
            "flat_logprobs_exact": exact,
            "vllm_no_logprobs_per_s": rate["vllm_h1_no_logprobs"],
            "vllm_ms_per_forecast": 1e3 / rate["vllm_h1"],
            "vllm_flat_ms_per_forecast": 1e3 / rate["vllm_h1_flat"],
            "vllm_no_logprobs_ms_per_request": 1e3 / rate["vllm_h1_no_logprobs"],
            "hf_ms_per_forecast": 1e3 / rate["hf_h1"],
            "seconds": {name: seconds[name] for name in ("hf_h1", "vllm_h1", "vllm_h1_flat", "vllm_h1_no_logprobs")},
        },
        "prompts": {
            "identical_windows": True,
            "symbols": args.symbols,
            "horizon1_tokens": {"min": min(lengths), "max": max(lengths), "mean": float(np.mean(lengths))},
        },
    }


def flat_next_token_probs(vllm, prompts):
    """``OfflineForecaster.next_token_probs`` read from vLLM's flat logprobs (``SamplingParams.flat_logprobs``).

    The same numbers (every token's logprob, exact), kept by vLLM in flat lists instead of one ``Logprob`` object
    per token per request, and read here without building a dict.
    """
    import numpy as np
    from vllm import SamplingParams

    vocab = vllm.tokenizer.vocab_size
    outputs = vllm.generate(prompts, SamplingParams(max_tokens=1, logprobs=vocab, flat_logprobs=True))
    probs = np.zeros((len(prompts), vocab))
    for row, output in zip(probs, outputs):
        flat = output.outputs[0].logprobs
        start, end = flat.start_indices[0], flat.end_indices[0]
        row[np.asarray(flat.token_ids[start:end])] = np.exp(np.asarray(flat.logprobs[start:end], dtype=np.float64))
    return probs


def _forecasts_from_probs(hf, probs, histories):
    from ..distribution import BinnedDistribution, Forecast

    return [
        Forecast.from_distribution(BinnedDistribution.from_token_probs(row, hf.tokenizer), prices[-1], QUANTILES)
        for row, prices in zip(probs, histories)
    ]


def _new_bar_latencies(vllm, prices, policy, ticks: int) -> dict:
    """Seconds to the first token of a request for ``prices[: n + 1]``, cold and with ``prices[:n]`` cached.

    Only bars whose history and history-plus-one share the policy's anchor are timed (the streaming case between
    rebases).
    """
    import numpy as np
    from vllm import SamplingParams

    one_token = SamplingParams(max_tokens=1)
    lengths = [n for n in range(len(prices) - 1, 1, -1) if policy.start(n) == policy.start(n + 1)][:ticks]
    cold, warm = [], []
    for n in lengths:
        history, with_new_bar = vllm.encode_context(prices[:n]), vllm.encode_context(prices[: n + 1])
        vllm.llm.reset_prefix_cache()
        start = time.perf_counter()
        vllm.generate([with_new_bar], one_token)
        cold.append(time.perf_counter() - start)
        vllm.llm.reset_prefix_cache()
        vllm.generate([history], one_token)
        start = time.perf_counter()
        vllm.generate([with_new_bar], one_token)
        warm.append(time.perf_counter() - start)
    return {
        "cold_ms": 1e3 * float(np.median(cold)),
        "warm_ms": 1e3 * float(np.median(warm)),
        "ratio": float(np.median(warm) / np.median(cold)),
        "ticks": len(lengths),
    }


# ------------------------------------------------------------------------------------------- (c) prefix hits
def stream_prices(series: str, bars: int):
    """The first ``bars`` closes of a bundled series."""
    from ..data import load_series

    closes = load_series(series)["close"].to_numpy(dtype="float64")
    if len(closes) < bars:
        raise ValueError(f"series {series!r} has {len(closes)} bars, fewer than the {bars} to stream")
    return closes[:bars]


def stream_prompts(encoder, prices, horizon: int = 1) -> list[list[int]]:
    """One prompt per bar: the policy's context of the history up to and including that bar."""
    return [list(encoder.encode_context(prices[:n], horizon)) for n in range(1, len(prices) + 1)]


def _stream_result(prompts, cached, latencies) -> dict:
    from ._common import percentile_ms
    from ._prefix_hits import hit_ratios, ideal_cached_tokens

    lengths = [len(prompt) for prompt in prompts]
    ideal = ideal_cached_tokens(prompts)
    result = hit_ratios(lengths, cached)
    result["ideal"] = hit_ratios(lengths, ideal)
    result["requests_below_ideal"] = sum(got < best for got, best in zip(cached, ideal))
    result["p50_ms"], result["p99_ms"] = percentile_ms(latencies, 50), percentile_ms(latencies, 99)
    return result


def _offline_stream(args, hf, vllm) -> dict:
    from vllm import SamplingParams

    prices = stream_prices(args.stream_series, args.stream_bars)
    prompts = stream_prompts(vllm, prices)
    matched_prompts(hf, vllm, [prices[:n] for n in range(len(prices) - 3, len(prices) + 1)], 1)
    params = SamplingParams(max_tokens=1, logprobs=vllm.tokenizer.vocab_size)
    vllm.llm.reset_prefix_cache()
    print(f"streaming {len(prompts)} bars of {args.stream_series} through the offline engine", flush=True)
    cached, latencies = [], []
    for prompt in prompts:
        start = time.perf_counter()
        (output,) = vllm.generate([prompt], params)
        latencies.append(time.perf_counter() - start)
        cached.append(output.num_cached_tokens or 0)
    return _stream_result(prompts, cached, latencies)


def _server_stream(args, client) -> dict:
    prices = stream_prices(args.stream_series, args.stream_bars)
    prompts = stream_prompts(client, prices)
    print(f"streaming {len(prompts)} bars of {args.stream_series} through the server", flush=True)
    cached, latencies = [], []
    for prompt in prompts:
        start = time.perf_counter()
        response = client.complete([prompt], max_tokens=1, logprobs=client.tokenizer.vocab_size)
        latencies.append(time.perf_counter() - start)
        details = response.usage.prompt_tokens_details
        cached.append((details.cached_tokens or 0) if details else 0)
    return _stream_result(prompts, cached, latencies)


# ------------------------------------------------------------------------------------------------ (b) servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server subprocess on 127.0.0.1 in its own process group, waited for on ``health_url`` and always stopped."""

    def __init__(self, command: list[str], health_url: str, log_path: Path, env: dict | None = None, name: str = ""):
        self.command, self.health_url, self.log_path, self.env, self.name = command, health_url, log_path, env, name
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        import httpx

        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        try:
            while True:
                try:
                    if httpx.get(self.health_url, timeout=2.0).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} server did not start:\n{self.log_path.read_text()[-3000:]}")
                time.sleep(1.0)
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        group = os.getpgid(self.process.pid)
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        try:  # the engine processes the server spawned, should any outlive it
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def _kvtrade_serve(args, checkpoint: Path, environment: dict):
    """A `kvtrade serve` server on a free local port for the ``with`` block; yields its base URL."""
    from ..serving import server_command

    port = free_port()
    command = server_command(checkpoint, port=port, enforce_eager=not args.compile)
    with tempfile.TemporaryDirectory() as scratch:
        print(f"starting `kvtrade serve` on 127.0.0.1:{port}", flush=True)
        with ServerProcess(command, f"http://127.0.0.1:{port}/health", Path(scratch) / "vllm.log", environment, "vLLM"):
            yield f"http://127.0.0.1:{port}"


def _server_sections(args, checkpoint: Path, sections) -> dict:
    from ..client import ForecastClient
    from ..context import ContextPolicy
    from ..forecasting import Forecaster
    from ..serving import DEFAULT_MAX_REQUEST_TOKENS, server_environment

    results: dict = {}
    if {"load", "prefix"} & set(sections):
        # These sections measure capacity, not fairness: their server admits the largest request they send (SYMBOLS
        # horizon-1 prompts in one request, PATHS samples of one prompt), each of up to a policy window.
        window = ContextPolicy.from_pretrained(checkpoint).window
        capacity = max(DEFAULT_MAX_REQUEST_TOKENS, max(args.symbols, args.paths) * window)
        with _kvtrade_serve(args, checkpoint, server_environment(max_request_tokens=capacity)) as base_url:
            client = ForecastClient(f"{base_url}/v1", checkpoint, timeout=args.level_timeout, max_request_tokens=capacity)
            if "prefix" in sections:
                results["prefix_hits"] = {"server": _server_stream(args, client)}
            if "load" in sections:
                hf = Forecaster.from_pretrained(checkpoint)  # only its encode_context: windows asserted equal
                results["horizon1_server"] = _server_logprobs_cost(args, client, hf)
                results["load"] = {"vllm_server": _vllm_load(args, client, hf)}
    if "fairness" in sections:
        results["fairness"] = _fairness_section(args, checkpoint)
    return results


def _fairness_section(args, checkpoint: Path) -> dict:
    """The fairness scenario against a `kvtrade serve` with its default sample limit and the budget asked for."""
    from ..serving import DEFAULT_MAX_SAMPLES, server_environment
    from ..tokenization_kvtrade import ReturnTokenizer

    budget = args.fairness_max_request_tokens
    with _kvtrade_serve(args, checkpoint, server_environment(max_request_tokens=budget)) as base_url:
        print("fairness: one-token forecasts beside heavy sampled-path requests at the budget", flush=True)
        return asyncio.run(
            _fairness.measure(
                f"{base_url}/v1/completions", checkpoint.name, ReturnTokenizer.from_pretrained(checkpoint),
                budget, DEFAULT_MAX_SAMPLES, args,
            )
        )  # fmt: skip


def _server_logprobs_cost(args, client, hf) -> dict:
    """Median time of one request for SYMBOLS horizon-1 prompts, with every token's logprob and with none."""
    import numpy as np

    histories = random_histories(args.symbols, args.bars, client.context_policy.stride, seed=7)
    prompts = matched_prompts(hf, client, histories, 1)
    vocab = client.tokenizer.vocab_size
    variants = {"with": {"logprobs": vocab}, "without": {}}
    client.complete(prompts, max_tokens=1)  # the prompts' blocks enter the prefix cache: both variants hit them
    seconds = {name: [] for name in variants}
    for _ in range(max(args.repeats, 1)):
        for name, params in variants.items():
            start = time.perf_counter()
            client.complete(prompts, max_tokens=1, **params)
            seconds[name].append(time.perf_counter() - start)
    return {
        "prompts": len(prompts),
        "logprobs": vocab,
        "with_logprobs_ms": 1e3 * float(np.median(seconds["with"])),
        "without_logprobs_ms": 1e3 * float(np.median(seconds["without"])),
    }


def _load_histories(args, kind: str, concurrency: int, stride: int) -> list:
    # Fresh series per kind and level, the same for both servers: each level starts with a cold prefix cache.
    seed = 1000 + 10 * concurrency + (kind == "paths")
    return random_histories(concurrency, args.bars, stride, seed)


def _vllm_load(args, client, hf) -> dict:
    import numpy as np

    url = f"{str(client.openai.base_url).rstrip('/')}/completions"
    results = {}
    for kind in args.load_kinds:
        for concurrency in args.concurrency:
            histories = _load_histories(args, kind, concurrency, client.context_policy.stride)
            horizon = 1 if kind == "h1" else args.steps
            bodies = []
            for prices in histories:
                prompts = matched_prompts(hf, client, _rounds(prices, args.rounds), horizon)
                bodies.append([json.dumps(vllm_request(client, prompt, kind, args)).encode() for prompt in prompts])

            def parse(answer, kind=kind):
                if kind == "h1":
                    top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
                    probs = np.zeros(client.tokenizer.vocab_size)
                    probs[[int(key.rsplit(":", 1)[1]) for key in top]] = np.exp(list(top.values()))
                    return probs
                return np.array([choice["token_ids"] for choice in answer["choices"]])

            if concurrency == args.concurrency[0]:
                _warm_up(url, [[json.dumps(vllm_request(client, prompt, kind, args)).encode()] for prompt in
                               matched_prompts(hf, client, random_histories(1, args.bars, 1, seed=5), horizon)])
            print(f"load: vLLM server, {kind}, {concurrency} clients x {args.rounds}", flush=True)
            results.setdefault(kind, {})[str(concurrency)] = asyncio.run(
                load_level(url, bodies, parse, args.level_timeout, cached_tokens=True)
            )
            _print_level(results[kind][str(concurrency)])
    return results


def _rounds(prices, rounds: int) -> list:
    """The histories a client sends, one new bar per round, ending with the whole of ``prices``."""
    return [prices[: len(prices) - rounds + 1 + r] for r in range(rounds)]


def vllm_request(client, prompt: list[int], kind: str, args) -> dict:
    """The `/v1/completions` body `ForecastClient.next_token_probs` / `.sample_paths` send for one prompt."""
    from ..distribution import PathSampling

    body = {"model": client.model, "prompt": [prompt], "return_token_ids": True, "return_tokens_as_token_ids": True}
    if kind == "h1":
        return {**body, "max_tokens": 1, "logprobs": client.tokenizer.vocab_size}
    return {**body, **PathSampling.for_tokenizer(client.tokenizer, args.steps, args.paths).vllm_kwargs()}


def _naive_load(args, checkpoint: Path, serialize: bool) -> dict:
    from ..context import ContextPolicy

    stride = ContextPolicy.from_pretrained(checkpoint).stride
    port = free_port()
    command = [sys.executable, "-m", f"{__package__}._naive_server", str(checkpoint), "--port", str(port)]
    if serialize:
        command.append("--serialize")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        print(f"starting the naive Transformers server on 127.0.0.1:{port}", flush=True)
        with ServerProcess(command, f"http://127.0.0.1:{port}/health", Path(scratch) / "naive.log", None, "naive"):
            for kind in args.load_kinds:
                for concurrency in args.concurrency:
                    histories = _load_histories(args, kind, concurrency, stride)
                    horizon = 1 if kind == "h1" else args.steps
                    bodies = [
                        [
                            json.dumps({"prices": history.tolist(), "horizon": horizon, "num_samples": args.paths}).encode()
                            for history in _rounds(prices, args.rounds)
                        ]
                        for prices in histories
                    ]

                    def parse(answer, kind=kind):
                        import numpy as np

                        return np.asarray(answer["probs"] if kind == "h1" else answer["paths"])

                    if concurrency == args.concurrency[0]:
                        warm = random_histories(1, args.bars, 1, seed=5)[0]
                        body = {"prices": warm.tolist(), "horizon": horizon, "num_samples": args.paths}
                        _warm_up(f"http://127.0.0.1:{port}/forecast", [[json.dumps(body).encode()]])
                    print(f"load: naive Transformers server{' (serialized)' * serialize}, {kind}, "
                          f"{concurrency} clients x {args.rounds}", flush=True)
                    results.setdefault(kind, {})[str(concurrency)] = asyncio.run(
                        load_level(f"http://127.0.0.1:{port}/forecast", bodies, parse, args.level_timeout)
                    )
                    _print_level(results[kind][str(concurrency)])
    return results


def _warm_up(url: str, bodies: list[list[bytes]]) -> None:
    """Untimed requests before a server's first level: its first calls of each kind are not what is measured."""
    import httpx

    for body in bodies[0][:1] * 2:
        httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=STARTUP_TIMEOUT_S)


async def load_level(url: str, bodies: list[list[bytes]], parse, timeout_s: float, cached_tokens: bool = False) -> dict:
    """Each inner list of ``bodies`` is one client: it POSTs its bodies one after the other, parsing each answer.

    All clients start together; the level stops by itself after ``timeout_s`` (unfinished clients are cancelled
    and counted). Latency is from sending a request to holding its parsed answer.
    """
    import httpx

    from ._common import percentile_ms

    latencies, errors, usage = [], [], {"prompt": 0, "cached": 0}
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=headers) as http:

        async def one_client(requests):
            for body in requests:
                start = time.perf_counter()
                try:
                    response = await http.post(url, content=body)
                    response.raise_for_status()
                    answer = response.json()
                    parse(answer)
                except (httpx.HTTPError, KeyError, ValueError) as error:
                    errors.append(f"{type(error).__name__}: {str(error)[:200]}")
                    continue
                latencies.append(time.perf_counter() - start)
                if cached_tokens:
                    usage["prompt"] += answer["usage"]["prompt_tokens"]
                    usage["cached"] += (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0

        start = time.perf_counter()
        tasks = [asyncio.create_task(one_client(requests)) for requests in bodies]
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    sent = sum(len(requests) for requests in bodies)
    result = {
        "clients": len(bodies),
        "requests": sent,
        "completed": len(latencies),
        "errors": len(errors),
        "unfinished": sent - len(latencies) - len(errors),
        "wall_s": wall,
        "throughput_per_s": len(latencies) / wall,
        "p50_ms": percentile_ms(latencies, 50) if latencies else None,
        "p99_ms": percentile_ms(latencies, 99) if latencies else None,
        "first_errors": errors[:3],
    }
    if cached_tokens and usage["prompt"]:
        result["cached_token_ratio"] = usage["cached"] / usage["prompt"]
    return result


def _print_level(level: dict) -> None:
    p50 = "-" if level["p50_ms"] is None else f"{level['p50_ms']:.0f}"
    p99 = "-" if level["p99_ms"] is None else f"{level['p99_ms']:.0f}"
    print(
        f"  {level['completed']}/{level['requests']} in {level['wall_s']:.1f} s: {level['throughput_per_s']:.2f}/s, "
        f"p50 {p50} ms, p99 {p99} ms, errors {level['errors']}, unfinished {level['unfinished']}",
        flush=True,
    )


NAIVE_SERVERS = ("transformers_naive", "transformers_naive_serialized")


def _load_ratios(load: dict) -> dict:
    """vLLM server over each naive server, per kind and level: throughput ratio and p50/p99 latency ratios."""
    ratios = {}
    for naive in NAIVE_SERVERS:
        for kind, levels in load.get("vllm_server", {}).items():
            for level, ours in levels.items():
                theirs = load.get(naive, {}).get(kind, {}).get(level)
                if not theirs or not ours["completed"] or not theirs["completed"]:
                    continue
                ratios.setdefault(naive, {}).setdefault(kind, {})[level] = {
                    "throughput_vllm_over_hf": ours["throughput_per_s"] / theirs["throughput_per_s"],
                    "p50_vllm_over_hf": ours["p50_ms"] / theirs["p50_ms"],
                    "p99_vllm_over_hf": ours["p99_ms"] / theirs["p99_ms"],
                }
    return ratios


# ------------------------------------------------------------------------------------------------- reporting
def explain(payload: dict) -> list[str]:
    """Where each side wins or loses, in words, from the measured numbers."""
    lines = []
    paths, h1 = payload.get("throughput"), payload.get("horizon1")
    if paths:
        lines.append(
            f"Sampled paths ({paths['kind']}): vLLM {paths['vllm_forecasts_per_s']:.1f}/s vs Transformers "
            f"{paths['hf_forecasts_per_s']:.1f}/s (x{paths['ratio']:.2f}), same windows, cold prefix cache."
        )
    if h1:
        logprob_ms = h1["vllm_ms_per_forecast"] - h1["vllm_no_logprobs_ms_per_request"]
        lines.append(
            f"Horizon 1: vLLM {h1['vllm_forecasts_per_s']:.1f}/s vs Transformers {h1['hf_forecasts_per_s']:.1f}/s "
            f"(x{h1['ratio']:.2f}). The same requests without logprobs run at {h1['vllm_no_logprobs_per_s']:.1f}/s: "
            f"{logprob_ms:.1f} of the {h1['vllm_ms_per_forecast']:.1f} ms per forecast go to returning all "
            f"logprobs, which vLLM's output path turns into one Python Logprob object per token per request. "
            f"With SamplingParams(flat_logprobs=True) (same numbers, exact: {h1['flat_logprobs_exact']}) it runs at "
            f"{h1['vllm_flat_logprobs_per_s']:.1f}/s (x{h1['flat_ratio']:.2f} of Transformers)."
        )
    hits = payload.get("prefix_hits", {})
    for side, result in hits.items():
        lines.append(
            f"Prefix cache, {side}: {result['requests']} bars streamed, cached/prompt tokens "
            f"{result['hit_ratio']:.3f}, over full 32-token blocks {result['full_block_hit_ratio']:.3f} "
            f"(an unbounded block cache would reach {result['ideal']['full_block_hit_ratio']:.3f}). The misses are "
            "the first request after each rebase (a new anchor, a new chain of blocks) and the one block vLLM "
            "recomputes when a prompt ends exactly on a block boundary."
        )
    server_h1 = payload.get("horizon1_server")
    if server_h1:
        lines.append(
            f"Horizon 1 through the server ({server_h1['prompts']} prompts in one request, prefix cache warm): "
            f"{server_h1['with_logprobs_ms']:.0f} ms with all {server_h1['logprobs']} logprobs, "
            f"{server_h1['without_logprobs_ms']:.0f} ms without: the OpenAI server builds a JSON object of "
            f"{server_h1['logprobs']} entries per forecast, which the model itself does not need."
        )
    for naive, kinds in payload.get("load", {}).get("ratios", {}).items():
        for kind, levels in kinds.items():
            for level, ratio in levels.items():
                lines.append(
                    f"Load, {kind}, {level} clients, vs {naive}: vLLM server throughput "
                    f"x{ratio['throughput_vllm_over_hf']:.2f}, p50 latency x{ratio['p50_vllm_over_hf']:.2f}, "
                    f"p99 x{ratio['p99_vllm_over_hf']:.2f} (latency below 1: vLLM answers faster)."
                )
    return lines


def summary(payload: dict) -> str:
    lines = ["== kvtrade bench serve =="]
    lines += payload.get("explanation", [])
    load = payload.get("load", {})
    for server in ("vllm_server", *NAIVE_SERVERS):
        for kind, levels in load.get(server, {}).items():
            for level, result in levels.items():
                lines.append(
                    f"  {server:29s} {kind:5s} {level:>4s} clients: {result['throughput_per_s']:.2f}/s, "
                    f"p50 {result['p50_ms'] or float('nan'):.0f} ms, p99 {result['p99_ms'] or float('nan'):.0f} ms, "
                    f"{result['completed']}/{result['requests']} ok"
                )
    if "fairness" in payload:
        machine = payload["machine"]
        lines += _fairness.report(payload["fairness"], f"{machine['cpu']}, {machine['cores']} cores")
    if "prefix" in payload:
        prefix = payload["prefix"]
        lines.append(
            f"new bar: cold {prefix['cold_ms']:.1f} ms, warm {prefix['warm_ms']:.1f} ms (warm/cold {prefix['ratio']:.3f})"
        )
    return "\n".join(lines)
