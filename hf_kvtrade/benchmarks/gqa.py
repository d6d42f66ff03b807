"""MHA vs GQA vs MQA at equal width: KV-cache bytes per token and cached-decode latency by context length.

The models differ only in ``num_key_value_heads`` and have random weights (neither cache size nor step latency
depends on them). Every timed decode step is cropped back so that it sees exactly the stated context, and the
models step in turn (round-robin), so a busy shared machine slows them alike.
"""

from __future__ import annotations

from functools import partial

from ._common import add_common_arguments, context_list, machine_info, markdown_table, percentile_ms, time_calls

FULL_CONTEXTS = (1024, 4096, 8192)
WARMUP_STEPS = 2
SEED_CLAIMS = {"cache_reduction": "2-4x less KV cache", "decode_speedup": "1.9-3.3x faster"}


def measure(
    preset="small", flavours=("mha", "gqa", "mqa"), contexts=FULL_CONTEXTS, decode_steps=30, attn_implementation="sdpa",
    device=None, seed=0
) -> dict:
    """One row per (flavour, context); the ratios are relative to the first flavour."""
    import torch

    from ..cache import FullKVCache, kv_cache_bytes
    from ..modeling_kvtrade import KVTradeForCausalLM
    from ..presets import load_preset

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else None
    contexts = sorted(contexts, reverse=True)
    machine = machine_info(device)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, load_preset(preset).vocab_size, (1, contexts[0] + 1), generator=generator).to(device)
    contenders = {}
    with torch.inference_mode():
        for flavour in flavours:
            config = load_preset(preset, attention=flavour, max_position_embeddings=max(contexts) + 1)
            config._attn_implementation = attn_implementation
            torch.manual_seed(seed)
            model = KVTradeForCausalLM(config).to(device).eval()
            # Room for the longest context plus the decode step's token, allocated before timing starts.
            cache = FullKVCache(config, capacity=contexts[0] + 1, dtype=torch.float32, device=device)
            model(input_ids=prompt[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
            contenders[flavour] = (model, cache)

        def decode_step(model, cache):
            model(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.crop(-1)

        rows = []
        for context in contexts:
            durations = {flavour: [] for flavour in flavours}
            for _, cache in contenders.values():
                cache.crop(-(cache.get_seq_length() - context))
            for _ in range(WARMUP_STEPS + decode_steps):
                for flavour, (model, cache) in contenders.items():
                    durations[flavour] += time_calls(partial(decode_step, model, cache), 1, 0, synchronize)
            rows += [
                {
                    "attention": flavour,
                    "num_attention_heads": model.config.num_attention_heads,
                    "num_key_value_heads": model.config.num_key_value_heads,
                    "context": context,
                    "cache_bytes_per_token": kv_cache_bytes(model.config, 1),
                    "cache_mib": kv_cache_bytes(model.config, context) / 2**20,
                    "decode_p50_ms": percentile_ms(durations[flavour][WARMUP_STEPS:], 50),
                    "decode_p90_ms": percentile_ms(durations[flavour][WARMUP_STEPS:], 90),
                    "decode_steps": decode_steps,
                    "machine": machine,
                }
                for flavour, (model, _) in contenders.items()
            ]
    # Ratios against the first flavour (reference / row: > 1 means better).
    reference = {row["context"]: row for row in rows if row["attention"] == flavours[0]}
    for row in rows:
        base = reference[row["context"]]
        row[f"cache_reduction_vs_{flavours[0]}"] = base["cache_bytes_per_token"] / row["cache_bytes_per_token"]
        row[f"decode_speedup_vs_{flavours[0]}"] = base["decode_p50_ms"] / row["decode_p50_ms"]
    return {
        "benchmark": "gqa",
        "preset": preset,
        "attn_implementation": attn_implementation,
        "dtype": "float32",
        "seed_claims": SEED_CLAIMS,
        "rows": sorted(rows, key=lambda row: row["context"]),
    }


def add_arguments(parser) -> None:
    add_common_arguments(parser, "gqa", quick="fewer timed decode steps (10 instead of 30)")
    parser.add_argument("--contexts", type=context_list, help=f"comma-separated context lengths (default: {FULL_CONTEXTS})")
    parser.add_argument("--preset", default="small", help="model shape (default: %(default)s)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=("eager", "sdpa"))
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def run(args) -> int:
    from ._common import write_json

    result = measure(
        preset=args.preset,
        contexts=args.contexts or FULL_CONTEXTS,
        decode_steps=10 if args.quick else 30,
        attn_implementation=args.attn_implementation,
        device=args.device,
    )
    print(markdown(result))
    print(f"wrote {write_json(args.json, result)}")
    return 0


def markdown(result: dict) -> str:
    columns = {
        "attention": "attention", "kv heads": "num_key_value_heads", "context": "context",
        "cache bytes/token": "cache_bytes_per_token", "decode p50 ms": "decode_p50_ms",
        "cache vs MHA": "cache_reduction_vs_mha", "speed vs MHA": "decode_speedup_vs_mha",
    }
    return markdown_table("MHA vs GQA vs MQA at equal width", columns, result["rows"], {})
