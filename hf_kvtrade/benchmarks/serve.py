"""`kvtrade bench serve`: vLLM against Transformers on the same context windows, side by side in one run.

``throughput`` times Transformers ``Forecaster`` (one symbol at a time, as its API works) against vLLM's offline
engine (all symbols in one batch) on identical prompts with a reset prefix cache; ``load`` times concurrent clients
against a real `kvtrade serve` and the server a user would write around ``Forecaster.predict`` (``_naive_server``);
``prefix`` measures the prefix-cache hit ratio of a live stream past the window; ``fairness`` is ``_fairness``.
Price histories are seeded random walks (cost does not depend on the prices), of lengths spread over one rebase
stride so that the windows cover every context length the policy produces.
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
from functools import partial

import numpy as np

from . import _fairness
from ._common import add_common_arguments, context_list, markdown_table, percentile_ms, time_calls, verdict

SECTIONS = ("throughput", "load", "prefix", "fairness")
QUICK = {"symbols": 8, "stream_bars": 400, "concurrency": (8, 32), "rounds": 1}
DEFAULT_JSON = "out/bench/serve.json"
QUANTILES = (0.05, 0.5, 0.95)
STARTUP_TIMEOUT_S = 600
NAIVE_SERVERS = ("transformers_naive", "transformers_naive_serialized")
# flag, type, default, help: the options that only take a value
OPTIONS = (
    ("--symbols", int, 64, "price histories in the throughput batch"),
    ("--bars", int, 2048, "shortest history, in bars"),
    ("--paths", int, 16, "sampled paths per forecast"),
    ("--steps", int, 8, "sampled forecast horizon in bars"),
    ("--repeats", int, 3, "timed batches per side; the median is reported"),
    ("--concurrency", context_list, "64,256", "concurrent clients, comma-separated"),
    ("--rounds", int, 2, "requests per client in the load test"),
    ("--level-timeout", float, 300.0, "seconds a load level may take before it is cut"),
    ("--stream-series", str, "sp500", "bundled series streamed for the hit ratio"),
    ("--stream-bars", int, 2000, "bars streamed, one request each"),
    ("--ticks", int, 8, "new-bar requests timed, warm and cold each"),
)


def add_arguments(parser) -> None:
    quick = (
        f"{QUICK['symbols']} symbols, {QUICK['stream_bars']} streamed bars, concurrency "
        f"{','.join(map(str, QUICK['concurrency']))}, {QUICK['rounds']} round"
    )
    add_common_arguments(parser, "serve", quick=quick, checkpoint=True)
    for flag, kind, default, text in OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument(
        "--load-kinds", nargs="+", choices=("h1", "paths"), default=["h1", "paths"],
        help="load-test requests: exact horizon-1 forecasts, sampled paths, or both (default: both)",
    )  # fmt: skip
    parser.add_argument(
        "--naive", choices=("threaded", "serialized", "both"), default="both",
        help="the naive server runs each connection's forecast at once (threaded), one at a time (serialized), "
        "or both are measured (the default)",
    )  # fmt: skip
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these parts")
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (slower start)")
    _fairness.add_arguments(parser)


# ----------------------------------------------------------------------------------------------------- prompts
def random_histories(count: int, bars: int, stride: int, seed: int) -> list:
    """``count`` seeded random-walk price series of ``bars`` to ``bars + stride - 1`` bars, spread evenly."""
    rng = np.random.default_rng(seed)
    lengths = [bars + index * stride // count for index in range(count)]
    return [100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, length))) for length in lengths]


def matched_prompts(hf, vllm_side, histories, horizon: int) -> list[list[int]]:
    """The windows a ``Forecaster`` and a vLLM-side ``encode_context`` build, asserted identical token for token."""
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


def stream_prompts(encoder, prices, horizon: int = 1) -> list[list[int]]:
    """One prompt per bar: the policy's context of the history up to and including that bar."""
    return [list(encoder.encode_context(prices[:n], horizon)) for n in range(1, len(prices) + 1)]


# ------------------------------------------------------------------------------------------------------- run
def run(args) -> int:
    # The vLLM engine runs in a spawned process; `kvtrade` is a console script, so the spawn guard holds.
    from ..checkpoint import checkpoint_dir
    from ..context import ContextPolicy
    from ._common import machine_info, write_json

    if args.quick:
        args.symbols, args.stream_bars = QUICK["symbols"], min(args.stream_bars, QUICK["stream_bars"])
        args.concurrency, args.rounds = QUICK["concurrency"], QUICK["rounds"]
    checkpoint = checkpoint_dir(args.checkpoint)
    policy = ContextPolicy.from_pretrained(checkpoint)
    sections = [name for name in SECTIONS if name in args.sections]
    load_average = {"start": list(os.getloadavg())}
    payload: dict = {
        "setup": {
            "model": str(checkpoint),
            "sections": sections,
            "policy": {"window": policy.window, "stride": policy.stride},
            **{name: getattr(args, name) for name in ("symbols", "paths", "steps", "repeats", "rounds", "naive")},
            "bars": f"{args.bars} to {args.bars + policy.stride - 1}",
            "concurrency": list(args.concurrency),
            "load_kinds": list(args.load_kinds),
            "load_average": load_average,
            "stream": {"series": args.stream_series, "bars": args.stream_bars},
            "vllm_compiled": args.compile,
            "quick": args.quick,
            "latency_statistic": "median of repeats for throughput; p50/p99 over requests under load",
        }
    }
    started = time.perf_counter()
    if "throughput" in sections or "prefix" in sections:
        payload.update(_offline_sections(args, checkpoint, policy, sections))
    load_average["before_server"] = list(os.getloadavg())
    if {"load", "prefix", "fairness"} & set(sections):
        for key, value in _server_sections(args, checkpoint, policy, sections).items():
            payload.setdefault(key, {}).update(value)
    if "load" in sections:
        for serialize in {"threaded": [False], "serialized": [True], "both": [True, False]}[args.naive]:
            load_average[f"before_naive{'_serialized' * serialize}"] = list(os.getloadavg())
            payload["load"][NAIVE_SERVERS[serialize]] = _naive_load(args, checkpoint, policy, serialize)
        payload["load"]["ratios"] = _load_ratios(payload["load"])
    payload["explanation"] = explain(payload)
    payload["setup"]["wall_s"] = round(time.perf_counter() - started, 1)
    payload["machine"] = machine_info()
    write_json(args.json, payload)
    print("\n" + summary(payload) + f"\nwrote {args.json}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------- (a) offline engine
def _offline_sections(args, checkpoint, policy, sections) -> dict:
    import torch
    from vllm import SamplingParams

    from ..client import OfflineForecaster
    from ..forecasting import Forecaster

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
            params = SamplingParams(max_tokens=1, logprobs=vllm.tokenizer.vocab_size)

            def cached_tokens(prompt):
                (output,) = vllm.generate([prompt], params)
                return output.num_cached_tokens or 0

            vllm.llm.reset_prefix_cache()
            results["prefix_hits"] = {"offline": _stream(args, hf, vllm, cached_tokens, "the offline engine")}
    finally:
        vllm.llm.llm_engine.engine_core.shutdown()
    return results


def _throughput(args, hf, vllm, policy) -> dict:
    from vllm import SamplingParams

    from ..distribution import BinnedDistribution, Forecast

    histories = random_histories(args.symbols, args.bars, policy.stride, seed=0)
    matched_prompts(hf, vllm, histories, args.steps)  # raises unless both sides read the same windows
    h1_prompts = matched_prompts(hf, vllm, histories, 1)
    vocab = hf.tokenizer.vocab_size
    exact = np.array_equal(flat_next_token_probs(vllm, h1_prompts[:4]), vllm.next_token_probs(h1_prompts[:4]))
    if not exact:
        raise AssertionError("flat logprobs differ from the client's logprobs: the cheaper path is not exact")
    candidates = {
        "hf_paths": lambda: [
            hf.predict(prices, horizon=args.steps, num_samples=args.paths, quantiles=QUANTILES) for prices in histories
        ],
        "vllm_paths": lambda: vllm.predict_batch(histories, args.steps, args.paths, quantiles=QUANTILES),
        "hf_h1": lambda: [hf.predict(prices, horizon=1, quantiles=QUANTILES) for prices in histories],
        "vllm_h1": lambda: vllm.predict_batch(histories, 1, quantiles=QUANTILES),
        "vllm_h1_flat": lambda: [
            Forecast.from_distribution(BinnedDistribution.from_token_probs(row, hf.tokenizer), prices[-1], QUANTILES)
            for row, prices in zip(flat_next_token_probs(vllm, h1_prompts), histories)
        ],
        # The model and scheduler alone: one token, no distribution returned (not a forecast).
        "vllm_h1_no_logprobs": lambda: vllm.generate(h1_prompts, SamplingParams(max_tokens=1)),
    }
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
    rate = {name: args.symbols / float(np.median(values)) for name, values in seconds.items()}
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
    """``OfflineForecaster.next_token_probs`` from ``SamplingParams(flat_logprobs=True)``: the same numbers, kept by
    vLLM in flat lists instead of one ``Logprob`` object per token per request, and read without building a dict."""
    from vllm import SamplingParams

    from ..distribution import next_token_kwargs

    sampling = SamplingParams(**next_token_kwargs(vllm.tokenizer.vocab_size), flat_logprobs=True)
    probs = []
    for output in vllm.generate(prompts, sampling):
        flat = output.outputs[0].logprobs
        start, end = flat.start_indices[0], flat.end_indices[0]
        probs.append(vllm._token_probs(flat.token_ids[start:end], flat.logprobs[start:end]))
    return np.stack(probs)


def _new_bar_latencies(vllm, prices, policy, ticks: int) -> dict:
    """Seconds to the first token of a request for ``prices[: n + 1]``, cold and with ``prices[:n]`` cached.

    Only bars whose history and history-plus-one share the policy's anchor are timed (streaming between rebases).
    """
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
def _stream(args, hf, encoder, cached_tokens, where: str) -> dict:
    """Streams the series one horizon-1 request per bar; ``cached_tokens(prompt)`` sends one and returns its hits."""
    from ..data import load_series
    from ._prefix_hits import hit_ratios, ideal_cached_tokens

    series, bars = args.stream_series, args.stream_bars
    prices = load_series(series)["close"].to_numpy(dtype="float64")
    if len(prices) < bars:
        raise ValueError(f"series {series!r} has {len(prices)} bars, fewer than the {bars} to stream")
    prices = prices[:bars]
    matched_prompts(hf, encoder, [prices[:n] for n in range(len(prices) - 3, len(prices) + 1)], 1)
    prompts = stream_prompts(encoder, prices)
    print(f"streaming {len(prompts)} bars of {args.stream_series} through {where}", flush=True)
    cached, latencies = [], []
    for prompt in prompts:
        start = time.perf_counter()
        cached.append(cached_tokens(prompt))
        latencies.append(time.perf_counter() - start)
    lengths, ideal = [len(prompt) for prompt in prompts], ideal_cached_tokens(prompts)
    return {
        **hit_ratios(lengths, cached),
        "ideal": hit_ratios(lengths, ideal),
        "requests_below_ideal": sum(got < best for got, best in zip(cached, ideal)),
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
    }


# ------------------------------------------------------------------------------------------------ (b) servers
@contextlib.contextmanager
def _local_server(name: str, command_for_port, env: dict | None = None):
    """A server subprocess on a free 127.0.0.1 port, waited for on ``/health``; yields its base URL. It runs in its
    own process group, stopped at the end with every process it spawned (vLLM's engine)."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    print(f"starting {name} on 127.0.0.1:{port}", flush=True)
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            command_for_port(port), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"{name} did not start:\n{log.read()[-3000:]}")
                time.sleep(1.0)
            yield base_url
        finally:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _kvtrade_serve(args, checkpoint, max_request_tokens: int):
    from ..serving import server_command, server_environment

    return _local_server(
        "`kvtrade serve`",
        lambda port: server_command(checkpoint, port=port, enforce_eager=not args.compile),
        server_environment(max_request_tokens=max_request_tokens),
    )


def _server_sections(args, checkpoint, policy, sections) -> dict:
    from ..client import ForecastClient
    from ..forecasting import Forecaster
    from ..serving import DEFAULT_MAX_REQUEST_TOKENS, DEFAULT_MAX_SAMPLES
    from ..tokenization_kvtrade import ReturnTokenizer

    results: dict = {}
    if {"load", "prefix"} & set(sections):
        hf = Forecaster.from_pretrained(checkpoint)  # only its encode_context: windows asserted equal
        # These sections measure capacity, not fairness: their server admits the largest request they send (SYMBOLS
        # horizon-1 prompts in one request, PATHS samples of one prompt), each of up to a policy window.
        capacity = max(DEFAULT_MAX_REQUEST_TOKENS, max(args.symbols, args.paths) * policy.window)
        with _kvtrade_serve(args, checkpoint, capacity) as base_url:
            client = ForecastClient(f"{base_url}/v1", checkpoint, timeout=args.level_timeout, max_request_tokens=capacity)
            if "prefix" in sections:

                def cached_tokens(prompt):
                    response = client.complete([prompt], max_tokens=1, logprobs=client.tokenizer.vocab_size)
                    details = response.usage.prompt_tokens_details
                    return (details.cached_tokens or 0) if details else 0

                results["prefix_hits"] = {"server": _stream(args, hf, client, cached_tokens, "the server")}
            if "load" in sections:
                results["horizon1_server"] = _server_logprobs_cost(args, client, hf)
                results["load"] = {"vllm_server": _vllm_load(args, client, hf)}
    if "fairness" in sections:
        budget = args.fairness_max_request_tokens
        with _kvtrade_serve(args, checkpoint, budget) as base_url:
            print("fairness: one-token forecasts beside heavy sampled-path requests at the budget", flush=True)
            results["fairness"] = asyncio.run(
                _fairness.measure(
                    f"{base_url}/v1/completions", checkpoint.name, ReturnTokenizer.from_pretrained(checkpoint),
                    budget, DEFAULT_MAX_SAMPLES, args,
                )
            )  # fmt: skip
    return results


def _server_logprobs_cost(args, client, hf) -> dict:
    """Median time of one request for SYMBOLS horizon-1 prompts, with every token's logprob and with none."""
    histories = random_histories(args.symbols, args.bars, client.context_policy.stride, seed=7)
    prompts = matched_prompts(hf, client, histories, 1)
    vocab = client.tokenizer.vocab_size
    client.complete(prompts, max_tokens=1)  # the prompts' blocks enter the prefix cache: both variants hit them
    seconds = {
        name: time_calls(partial(client.complete, prompts, max_tokens=1, **params), max(args.repeats, 1), warmup=0)
        for name, params in {"with": {"logprobs": vocab}, "without": {}}.items()
    }
    return {
        "prompts": len(prompts),
        "logprobs": vocab,
        "with_logprobs_ms": 1e3 * float(np.median(seconds["with"])),
        "without_logprobs_ms": 1e3 * float(np.median(seconds["without"])),
    }


def _rounds(prices, rounds: int) -> list:
    """The histories a client sends, one new bar per round, ending with the whole of ``prices``."""
    return [prices[: len(prices) - rounds + 1 + r] for r in range(rounds)]


def _load(args, server: str, url: str, stride: int, client_bodies, parse, cached_tokens: bool = False) -> dict:
    """Every load kind and level against one server; ``client_bodies(prices, kind, rounds)`` gives one client's
    JSON bodies, ``parse(kind, answer)`` reads an answer as a client would."""
    import httpx

    results = {}
    for kind in args.load_kinds:
        # Untimed: a server's first calls of each kind are not what is measured.
        warm_up = client_bodies(random_histories(1, args.bars, 1, seed=5)[0], kind, 1)[0]
        for _ in range(2):
            httpx.post(url, content=warm_up, headers={"Content-Type": "application/json"}, timeout=STARTUP_TIMEOUT_S)
        for concurrency in args.concurrency:
            # Fresh series per kind and level, the same for both servers: each level starts with a cold prefix cache.
            histories = random_histories(concurrency, args.bars, stride, 1000 + 10 * concurrency + (kind == "paths"))
            bodies = [client_bodies(prices, kind, args.rounds) for prices in histories]
            print(f"load: {server}, {kind}, {concurrency} clients x {args.rounds}", flush=True)
            level = asyncio.run(load_level(url, bodies, partial(parse, kind), args.level_timeout, cached_tokens))
            print(f"  {_level_line(level)}", flush=True)
            results.setdefault(kind, {})[str(concurrency)] = level
    return results


def _vllm_load(args, client, hf) -> dict:
    """The `/v1/completions` bodies `ForecastClient.next_token_probs` / `.sample_paths` send, one prompt each."""
    from ..client import TOKEN_ID_OUTPUT
    from ..distribution import PathSampling, next_token_kwargs

    body = {"model": client.model, **TOKEN_ID_OUTPUT}
    sampling = {
        "h1": next_token_kwargs(client.tokenizer.vocab_size),
        "paths": PathSampling.for_tokenizer(client.tokenizer, args.steps, args.paths).vllm_kwargs(),
    }

    def client_bodies(prices, kind, rounds):
        prompts = matched_prompts(hf, client, _rounds(prices, rounds), 1 if kind == "h1" else args.steps)
        return [json.dumps({**body, **sampling[kind], "prompt": [prompt]}).encode() for prompt in prompts]

    def parse(kind, answer):
        if kind == "paths":
            return np.array([choice["token_ids"] for choice in answer["choices"]])
        return client.probs_from_top_logprobs(answer["choices"][0]["logprobs"]["top_logprobs"][0])

    url = f"{str(client.openai.base_url).rstrip('/')}/completions"
    return _load(args, "vLLM server", url, client.context_policy.stride, client_bodies, parse, cached_tokens=True)


def _naive_load(args, checkpoint, policy, serialize: bool) -> dict:
    def client_bodies(prices, kind, rounds):
        horizon = 1 if kind == "h1" else args.steps
        return [
            json.dumps({"prices": history.tolist(), "horizon": horizon, "num_samples": args.paths}).encode()
            for history in _rounds(prices, rounds)
        ]

    def parse(kind, answer):
        return np.asarray(answer["probs"] if kind == "h1" else answer["paths"])

    name = f"naive Transformers server{' (serialized)' * serialize}"
    command = [sys.executable, "-m", f"{__package__}._naive_server", str(checkpoint), *["--serialize"] * serialize]
    with _local_server(name, lambda port: [*command, "--port", str(port)]) as base_url:
        return _load(args, name, f"{base_url}/forecast", policy.stride, client_bodies, parse)


async def load_level(url: str, bodies: list[list[bytes]], parse, timeout_s: float, cached_tokens: bool = False) -> dict:
    """Each inner list of ``bodies`` is one client: it POSTs its bodies one after the other, parsing each answer.

    All clients start together; after ``timeout_s`` the unfinished ones are cancelled and counted. Latency is from
    sending a request to holding its parsed answer.
    """
    import httpx

    latencies, errors, usage = [], [], {"prompt": 0, "cached": 0}
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=headers) as http:

        async def one_client(requests):
            for body in requests:
                start = time.perf_counter()
                try:
                    answer = (await http.post(url, content=body)).raise_for_status().json()
                    parse(answer)
                except (httpx.HTTPError, KeyError, ValueError) as error:
                    errors.append(f"{type(error).__name__}: {str(error)[:200]}")
                    continue
                latencies.append(time.perf_counter() - start)
                if cached_tokens:
                    usage["prompt"] += answer["usage"]["prompt_tokens"]
                    usage["cached"] += (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0

        start = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(one_client(requests) for requests in bodies))
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


def _level_line(level: dict) -> str:
    p50, p99 = ("-" if level[key] is None else f"{level[key]:.0f}" for key in ("p50_ms", "p99_ms"))
    return (
        f"{level['completed']}/{level['requests']} in {level['wall_s']:.1f} s: {level['throughput_per_s']:.2f}/s, "
        f"p50 {p50} ms, p99 {p99} ms, errors {level['errors']}, unfinished {level['unfinished']}"
    )


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
    for side, result in payload.get("prefix_hits", {}).items():
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


def markdown(payload: dict) -> str:
    """The report.md tables: forecasts per second and new-bar latency, and with ``fairness`` its light requests."""
    throughput, prefix, machine = payload["throughput"], payload["prefix"], payload["machine"]
    columns = {"measure": "measure", "Transformers / cold": "hf", "vLLM / warm": "vllm", "ratio": "ratio"}
    rows = [
        {"measure": "forecasts per second", "hf": throughput["hf_forecasts_per_s"],
         "vllm": throughput["vllm_forecasts_per_s"], "ratio": throughput["ratio"]},
        {"measure": "new-bar latency ms (prefix cold vs warm)", "hf": prefix["cold_ms"], "vllm": prefix["warm_ms"],
         "ratio": prefix["ratio"]},
    ]  # fmt: skip
    parts = [markdown_table("Transformers vs vLLM serving", columns, rows, machine)]
    if "fairness" in payload:
        fairness = payload["fairness"]
        columns = {
            "p99 idle ms": "idle_p99_ms", "p50 loaded ms": "loaded_p50_ms", "p99 loaded ms": "loaded_p99_ms",
            "target p99 < 1 s": lambda _: verdict(fairness["target"]["met"]),
            "over-budget request": lambda _: fairness["over_budget"]["status"],
        }
        title = f"One-token requests beside heavy sampled paths (budget {fairness['budget_tokens']} tokens)"
        parts.append(markdown_table(title, columns, [fairness["light"]], machine))
    return "\n\n".join(parts)


def summary(payload: dict) -> str:
    lines = ["== kvtrade bench serve ==", *payload.get("explanation", [])]
    for server in ("vllm_server", *NAIVE_SERVERS):
        for kind, levels in payload.get("load", {}).get(server, {}).items():
            for level, result in levels.items():
                lines.append(f"  {server:29s} {kind:5s} {level:>4s} clients: {_level_line(result)}")
    if "fairness" in payload:
        machine = payload["machine"]
        lines += _fairness.report(payload["fairness"], f"{machine['cpu']}, {machine['cores']} cores")
    if "prefix" in payload:  # with the throughput section: the tables of report.md
        lines.append(markdown(payload))
    return "\n".join(lines)
