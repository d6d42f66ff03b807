"""Serving a KVTrade checkpoint with vLLM's OpenAI-compatible server, hardened against bad input.

Prompts are return-bin token ids (no text tokenizer), and in that mode vLLM does not check them: on the CPU engine
one id outside the vocabulary kills the worker and the server with it. ``PromptGuard``, an ASGI middleware loaded
by vLLM's ``--middleware``, answers such requests with a 400 before the engine sees them, as it does every prompt
that is not token ids (vLLM would coerce ``"5"`` and ``5.0`` to id 5, or fail with a 500).

It also keeps the server fair. vLLM schedules first come, first served, so one request for many sampled tokens
holds the engine while every request behind it waits (a one-token forecast once waited 12 s behind ``n=1024,
max_tokens=8000``). So the guard caps ``n`` (``kvtrade serve --max-samples``) and the work of one request,
``n x (prompt tokens + max_tokens)`` over its prompts (``--max-request-tokens``); both must be JSON integers, which
vLLM would not check. vLLM validates everything else itself (prompt length, ``max_tokens``, JSON, the API key).
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
# How `kvtrade serve --max-samples` and `--max-request-tokens` reach the guard inside vLLM's server process.
MAX_SAMPLES_ENV = "KVTRADE_MAX_SAMPLES"
MAX_REQUEST_TOKENS_ENV = "KVTRADE_MAX_REQUEST_TOKENS"
GUARDED_PATHS = ("/v1/completions",)
# The CPU attention backend only accepts block sizes that are multiples of 32.
CPU_BLOCK_SIZE = 32
# Tokens the engine may schedule in one step: many whole prompts of the policy's window.
MAX_BATCHED_TOKENS = 8192
# The work one request may ask for, n x (prompt tokens + max_tokens): one engine step's worth. On the 2-core CPU
# this keeps the p99 latency of one-token forecasts below 1 s while clients send sampled paths at the budget
# (`kvtrade bench serve --sections fairness`; docs/serving.md); a budget of 32768 let it reach 8 s.
DEFAULT_MAX_REQUEST_TOKENS = MAX_BATCHED_TOKENS


class PromptGuard:
    """Pure ASGI middleware: a 400 in vLLM's error format for a ``/v1/completions`` body that `find_problem` refuses.

    The vocabulary size comes from the served model's config in ``app.state.vllm_config``.
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
        problem = self.find_problem(body, scope["app"].state.vllm_config.model_config.get_vocab_size())
        if problem is None:
            await self.app(scope, _replay(body, receive), send)
        else:
            await _reject(*problem, scope, receive, send)

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
        if (problem := prompt_problem(prompt, vocab_size)) is not None:
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


# What a value that is not a list, and a list too many, are at the top of a prompt and inside a batch.
_AT_TOP = ("not a list of token ids", "a list among token ids, and ids and lists do not mix at one level")
_IN_A_BATCH = ("not a list of token ids like prompt[0]", "a list, nested deeper than a batch of lists of token ids")


def prompt_problem(prompt, vocab_size: int) -> str | None:
    """What is wrong with a ``prompt`` and where (``prompt[1][2]``), or None when it is token ids for this model.

    A valid prompt is one non-empty list of integer ids in ``[0, vocab_size)``, or a non-empty list of such lists.
    The server has no text tokenizer, so text is refused like any other value that is not an id.
    """
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        problems = (_ids_problem(ids, f"prompt[{i}]", vocab_size, *_IN_A_BATCH) for i, ids in enumerate(prompt))
        problem = next(filter(None, problems), None)
    else:
        problem = _ids_problem(prompt, "prompt", vocab_size, *_AT_TOP)
    if problem is None:
        return None
    return (
        f"{problem}: a prompt is a non-empty list of ReturnTokenizer ids in [0, {vocab_size}) (0-3 special, then "
        "one id per return bin), or a non-empty list of such lists"
    )


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
    reason = "and this server has no text tokenizer" if isinstance(value, str) else expected
    return f"{where} is {_describe(value)}, {reason}"


# What a parsed JSON value is, by its Python type.
_JSON_SCALARS = {str: "text ({})", bool: "the boolean {}", int: "token id {}", float: "the float {}"}
_JSON_OTHERS = {dict: "a JSON object", list: "a list", type(None): "null"}


def _describe(value) -> str:
    if type(value) in _JSON_OTHERS:
        return _JSON_OTHERS[type(value)]
    return _JSON_SCALARS[type(value)].format(_show(value))


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
    pending = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def replay():
        return next(pending, None) or await receive()

    return replay


async def _reject(message: str, parameter: str, scope, receive, send) -> None:
    from starlette.responses import JSONResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMValidationError

    error = create_error_response(VLLMValidationError(message, parameter=parameter))
    await JSONResponse(content=error.model_dump(), status_code=error.error.code)(scope, receive, send)


def engine_settings(checkpoint: str | os.PathLike) -> dict:
    """vLLM engine arguments shared by `kvtrade serve` and `hf_kvtrade.client.OfflineForecaster`.

    ``max_model_len`` is the context policy's window, so no prompt plus its forecast reaches an untrained position;
    ``max_logprobs`` covers the vocabulary, so a horizon-1 forecast reads the whole next-bar distribution. Prompts
    are prefilled whole: vLLM rewinds the seeded generator of a prompt prefilled in chunks, CPU generators cannot
    rewind, and one request with a ``seed`` and a long prompt would otherwise kill the engine.
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
    """Command line of vLLM's OpenAI-compatible server (its module: the CPU build's ``vllm`` script is broken)."""
    checkpoint = checkpoint_dir(checkpoint)
    settings = {**engine_settings(checkpoint), "dtype": dtype, "enforce_eager": enforce_eager}
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
    return command + (["--api-key", api_key] if api_key else [])


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
