"""Serving a KVTrade checkpoint with vLLM's OpenAI-compatible server, hardened against bad input.

The checkpoint is served without a text tokenizer (prompts are lists of return-bin token ids), and in that mode
vLLM does not check token ids: on the CPU engine a single id outside the vocabulary kills the worker and the
server with it. ``PromptGuard`` is an ASGI middleware, loaded by vLLM's own ``--middleware`` option, that rejects
such requests with a 400 before the engine sees them, and with them every other prompt that is not token ids, which
vLLM would coerce (``"5"`` and ``5.0`` pass as id 5) or fail on with a 500.

The guard also keeps the server fair. vLLM schedules first come, first served, so one request that asks for a
great many sampled tokens holds the engine's sequence slots while every request behind it waits: a one-token
forecast once waited 12 s behind ``n=1024, max_tokens=8000``. The guard therefore caps the work of one request,
``n x (prompt tokens + max_tokens)`` summed over its prompts, at a token budget (``kvtrade serve
--max-request-tokens``), and it caps ``n`` (``--max-samples``); both must be JSON integers, as vLLM would otherwise
coerce ``"5000"`` and ``5000.0`` past the caps. Everything else vLLM validates itself (too long prompts,
``max_tokens`` beyond the context, malformed JSON, the API key); the tests check each case.
"""

from __future__ import annotations

import json
import os
import sys

from .checkpoint import checkpoint_dir
from .context import ContextPolicy
from .tokenization_kvtrade import ReturnTokenizer

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_SAMPLES = 1024
# vLLM's own default when a completion request leaves max_tokens out or null.
VLLM_DEFAULT_MAX_TOKENS = 16
# The guard runs inside the server process, which vLLM starts from its own command line; this is how
# `kvtrade serve --max-samples` and `--max-request-tokens` reach it.
MAX_SAMPLES_ENV = "KVTRADE_MAX_SAMPLES"
MAX_REQUEST_TOKENS_ENV = "KVTRADE_MAX_REQUEST_TOKENS"
GUARDED_PATHS = ("/v1/completions",)
# The CPU attention backend only accepts block sizes that are multiples of 32.
CPU_BLOCK_SIZE = 32
# Tokens the engine may schedule in one step: many whole prompts of the policy's window at once.
MAX_BATCHED_TOKENS = 8192
# The work one request may ask for, n x (prompt tokens + max_tokens): one engine step's worth. On the 2-core CPU
# this keeps the p99 latency of one-token forecasts below 1 s while clients send sampled paths at the budget
# (`kvtrade bench serve --sections fairness`; docs/serving.md); a budget of 32768 let it reach 8 s.
DEFAULT_MAX_REQUEST_TOKENS = MAX_BATCHED_TOKENS


class PromptGuard:
    """Pure ASGI middleware that checks ``/v1/completions`` bodies before vLLM parses them.

    Rejects, with vLLM's own error format and a 400: any ``prompt`` that ``prompt_problem`` refuses, ``n`` or
    ``max_tokens`` that are not JSON integers, ``n`` above the server's sample limit, and a request whose work
    ``n x (prompt tokens + max_tokens)`` exceeds the server's per-request token budget (one request would otherwise
    hold the engine while every other waits). The vocabulary size comes from the served model's config in
    ``app.state.vllm_config``.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.max_samples = int(os.environ.get(MAX_SAMPLES_ENV, DEFAULT_MAX_SAMPLES))
        self.max_request_tokens = int(os.environ.get(MAX_REQUEST_TOKENS_ENV, DEFAULT_MAX_REQUEST_TOKENS))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope["path"] not in GUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        vocab_size = scope["app"].state.vllm_config.model_config.get_vocab_size()
        problem = self.find_problem(body, vocab_size)
        if problem is not None:
            message, parameter = problem
            await _reject(message, parameter, scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def find_problem(self, body: bytes, vocab_size: int) -> tuple[str, str] | None:
        """``(message, parameter)`` of the first problem vLLM would not catch itself, or None."""
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            # Malformed JSON, integers too long to parse, nesting too deep to parse: vLLM answers each with a 400.
            return None
        if not isinstance(request, dict):
            return None
        for name in ("n", "max_tokens"):
            value = request.get(name)
            if value is not None and not _is_integer(value):
                return f"{name} is {_describe(value)}, not an integer", name
        n = request.get("n", 1)
        if n > self.max_samples:
            return f"n is {_show(n)}, above this server's limit of {self.max_samples} samples per request", "n"
        # A request without a prompt is vLLM's to refuse: it names prompt_embeds as the alternative.
        if "prompt" not in request:
            return None
        prompt = request["prompt"]
        problem = prompt_problem(prompt, vocab_size)
        if problem is not None:
            return problem, "prompt"
        max_tokens = request.get("max_tokens")
        max_tokens = VLLM_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        prompts = prompt if isinstance(prompt[0], list) else [prompt]
        work = n * sum(len(ids) + max_tokens for ids in prompts)
        if work > self.max_request_tokens:
            return (
                f"this request asks for n x (prompt tokens + max_tokens) = {n} x "
                f"{' + '.join(f'({len(ids)} + {max_tokens})' for ids in prompts[:3])}{' + ...' * (len(prompts) > 3)} "
                f"= {work} tokens, above this server's limit of {self.max_request_tokens} tokens per request "
                "(kvtrade serve --max-request-tokens): ask for fewer samples or tokens, or split the request"
            ), "n"
        return None


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true parses to True, an int.


def prompt_problem(prompt, vocab_size: int) -> str | None:
    """What is wrong with a ``prompt`` and where (``prompt[1][2]``), or None when it is token ids for this model.

    A valid prompt is one non-empty list of integer ids in ``[0, vocab_size)``, or a non-empty list of such lists.
    The server has no text tokenizer, so text is refused like any other value that is not an id.
    """
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        problem = _batch_problem(prompt, vocab_size)
    else:
        problem = _ids_problem(
            prompt, "prompt", vocab_size, "not a list of token ids",
            "a list among token ids, and ids and lists do not mix at one level",
        )  # fmt: skip
    if problem is None:
        return None
    return (
        f"{problem}: a prompt is a non-empty list of ReturnTokenizer ids in [0, {vocab_size}) (0-3 special, then "
        "one id per return bin), or a non-empty list of such lists"
    )


def _batch_problem(batch: list, vocab_size: int) -> str | None:
    for index, ids in enumerate(batch):
        problem = _ids_problem(
            ids, f"prompt[{index}]", vocab_size, "not a list of token ids like prompt[0]",
            "a list, nested deeper than a batch of lists of token ids",
        )  # fmt: skip
        if problem is not None:
            return problem
    return None


def _ids_problem(ids, where: str, vocab_size: int, not_a_list: str, nested: str) -> str | None:
    if not isinstance(ids, list):
        return _value_problem(ids, where, not_a_list)
    if not ids:
        return f"{where} is an empty list"
    for index, token in enumerate(ids):
        here = f"{where}[{index}]"
        if isinstance(token, list):
            return f"{here} is {nested}"
        if not _is_integer(token):
            return _value_problem(token, here, "not a token id")
        if not 0 <= token < vocab_size:
            return f"{here} is token id {_show(token)}, outside this model's vocabulary"
    return None


def _value_problem(value, where: str, expected: str) -> str:
    if isinstance(value, str):
        return f"{where} is text ({_show(value)}), and this server has no text tokenizer"
    return f"{where} is {_describe(value)}, {expected}"


def _describe(value) -> str:
    if isinstance(value, str):
        return f"text ({_show(value)})"
    if isinstance(value, bool):
        return f"the boolean {_show(value)}"
    if isinstance(value, int):
        return f"token id {_show(value)}"
    if isinstance(value, float):
        return f"the float {_show(value)}"
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a list"
    return "null"


def _show(value, limit: int = 40) -> str:
    """``value`` as JSON, cut to ``limit`` characters: what a client sends can be megabytes long."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that hands the already-read body to the app once, then defers to the client connection."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reject(message: str, parameter: str, scope, receive, send) -> None:
    from starlette.responses import JSONResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMValidationError

    error = create_error_response(VLLMValidationError(message, parameter=parameter))
    await JSONResponse(content=error.model_dump(), status_code=error.error.code)(scope, receive, send)


def engine_settings(checkpoint: str | os.PathLike) -> dict:
    """vLLM engine arguments shared by `kvtrade serve` and `hf_kvtrade.client.OfflineForecaster`.

    ``max_model_len`` is the checkpoint's context-policy window, so no prompt plus its forecast reaches a
    position the model was not trained on. No text tokenizer (prompts are ReturnTokenizer ids), prefix caching (every new bar re-uses the cached
    history), block size 32, fp32, and ``max_logprobs`` covering the whole vocabulary (a horizon-1 forecast reads
    the full next-bar distribution). Prompts are prefilled whole, never in chunks: vLLM rewinds the seeded
    generator of a request whose prompt was prefilled in part, CPU generators cannot rewind, and one request with
    a ``seed`` and a long prompt would otherwise kill the engine.
    """
    window = ContextPolicy.from_pretrained(checkpoint).window
    return {
        "max_model_len": window,
        "skip_tokenizer_init": True,
        "enable_prefix_caching": True,
        "block_size": CPU_BLOCK_SIZE,
        "dtype": "float32",
        "max_logprobs": ReturnTokenizer.from_pretrained(checkpoint).vocab_size,
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max(MAX_BATCHED_TOKENS, window),
    }


def server_command(
    checkpoint: str | os.PathLike,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    served_model_name: str | None = None,
    dtype: str = "float32",
    enforce_eager: bool = False,
) -> list[str]:
    """Command line of vLLM's OpenAI-compatible server for a KVTrade checkpoint.

    The CPU build's ``vllm`` script is broken, so this runs the module with ``engine_settings`` as flags; usage
    reports cached prompt tokens.
    """
    checkpoint = checkpoint_dir(checkpoint)
    settings = engine_settings(checkpoint)
    settings["dtype"] = dtype
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(checkpoint),
        "--served-model-name", served_model_name or checkpoint.name,
        "--host", host,
        "--port", str(port),
        "--enable-prompt-tokens-details",
        "--middleware", f"{PromptGuard.__module__}.{PromptGuard.__qualname__}",
    ]  # fmt: skip
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is False:
            command.append(flag.replace("--", "--no-", 1))
        else:
            command += [flag, str(value)]
    if api_key:
        command += ["--api-key", api_key]
    if enforce_eager:
        command.append("--enforce-eager")
    return command


def server_environment(
    max_samples: int = DEFAULT_MAX_SAMPLES, max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS
) -> dict[str, str]:
    """Environment for the server process: the guard's sample limit and token budget, and a 1 GiB KV cache unless
    set already (vLLM's CPU worker would otherwise reserve most of the machine's memory)."""
    for name, value in (("max_samples", max_samples), ("max_request_tokens", max_request_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    environment = dict(os.environ)
    environment.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    environment[MAX_SAMPLES_ENV] = str(max_samples)
    environment[MAX_REQUEST_TOKENS_ENV] = str(max_request_tokens)
    return environment


def usage_instructions(host: str, port: int, model: str, api_key: str | None, checkpoint: str | os.PathLike) -> str:
    """How to call a running server, with curl and with the Python client."""
    base_url = f"http://{host}:{port}/v1"
    auth_header = f' -H "Authorization: Bearer {api_key}"' if api_key else ""
    api_key_arg = f", api_key={api_key!r}" if api_key else ""
    return f"""\
Serving {model} at {base_url} (OpenAI-compatible; prompts are ReturnTokenizer token ids).

  curl {base_url}/completions -H "Content-Type: application/json"{auth_header} \\
    -d '{{"model": "{model}", "prompt": [1, 520, 515, 530], "max_tokens": 1, "logprobs": 5,
         "return_tokens_as_token_ids": true}}'

  from hf_kvtrade.client import ForecastClient
  client = ForecastClient("{base_url}", "{checkpoint}"{api_key_arg})
  forecast = client.predict(prices, horizon=1)          # exact next-bar distribution
  forecast = client.predict(prices, horizon=8, num_samples=256)  # sampled paths
"""


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_REQUEST_TOKENS",
    "DEFAULT_MAX_SAMPLES",
    "DEFAULT_PORT",
    "PromptGuard",
    "prompt_problem",
    "server_command",
    "server_environment",
    "usage_instructions",
]
