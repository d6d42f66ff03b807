"""`kvtrade serve [CHECKPOINT]`: vLLM's OpenAI-compatible server for a KVTrade checkpoint."""

from __future__ import annotations

from ..checkpoint import SHIPPED_CHECKPOINT


def register(subparsers) -> None:
    from ..serving import DEFAULT_HOST, DEFAULT_MAX_REQUEST_TOKENS, DEFAULT_MAX_SAMPLES, DEFAULT_PORT

    parser = subparsers.add_parser(
        "serve", help="serve a checkpoint with vLLM (OpenAI-compatible /v1/completions over token ids)"
    )
    parser.add_argument(
        "checkpoint", nargs="?", default=str(SHIPPED_CHECKPOINT),
        help="model folder saved by Forecaster.save_pretrained (default: the shipped model)",
    )  # fmt: skip
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s, local only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default: %(default)s)")
    parser.add_argument("--api-key", help="require this bearer token on /v1 requests")
    parser.add_argument("--served-model-name", help="model name clients send (default: the folder's name)")
    parser.add_argument(
        "--max-samples", type=int, default=DEFAULT_MAX_SAMPLES, help="largest n per request (default: %(default)s)"
    )
    parser.add_argument(
        "--max-request-tokens", type=int, default=DEFAULT_MAX_REQUEST_TOKENS,
        help="largest work of one request, n x (prompt tokens + max_tokens), so that no request holds the engine "
        "while the others wait (default: %(default)s; see docs/serving.md)",
    )  # fmt: skip
    parser.add_argument("--dtype", default="float32", help="weights and activations dtype (default: %(default)s)")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="skip torch.compile: starts faster, runs a little slower"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    import os
    from pathlib import Path

    from ..serving import server_command, server_environment, usage_instructions

    try:
        environment = server_environment(args.max_samples, args.max_request_tokens)
        options = ("host", "port", "api_key", "served_model_name", "dtype", "enforce_eager")
        command = server_command(args.checkpoint, **{name: getattr(args, name) for name in options})
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"kvtrade serve: {error}") from None
    model = args.served_model_name or Path(args.checkpoint).name
    print(usage_instructions(args.host, args.port, model, args.api_key, args.checkpoint), flush=True)
    # The server replaces this process, so signals (Ctrl-C, SIGTERM) reach vLLM, which stops its engine cleanly.
    os.execve(command[0], command, environment)
