"""Subcommands of `kvtrade`: one module each, exposing `register(subparsers)`."""
