"""Attention backends at long context: prefill time and peak memory of eager vs sdpa (vs flash_attention_2), one-shot vs
chunked (``generate(max_new_tokens=1)`` on a random prompt, whole or in ``GenerationConfig.prefill_chunk_size`` chunks).

Peak memory is the extra memory the prefill needed on top of the loaded model: on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before the call. On CPU, torch keeps no allocator statistics:
the rows run in a fresh worker process that lowers glibc's mmap threshold to 64 KiB (``mallopt(M_MMAP_THRESHOLD)``),
so that every tensor buffer is its own mapping and freeing it returns it to the OS: resident memory then follows live
tensors, not malloc's retained heap. The kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) before each
prefill, and the peak is ``VmHWM - VmRSS`` from ``/proc/self/status``.

Eager attention materialises ``heads x query x key`` fp32 scores per layer (8 x 16k x 16k = 8 GiB at 16k):
configurations whose score tensors would not fit in the available memory are skipped with the reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ._common import add_common_arguments, context_list, machine_info, markdown_table, time_calls, write_json

FULL_CONTEXTS = (2048, 8192, 16384)
# --quick: one decoder layer and no 16k. Attention scores are freed layer by layer, so one layer's peak memory is
# about the whole stack's (the other layers' KV cache, a few MiB, is the difference); prefill times are about
# 1/num_layers of the full model's.
QUICK_CONTEXTS = (2048, 8192)
QUICK_LAYERS = 1
BACKENDS = ("eager", "sdpa", "flash_attention_2")
SEED_CLAIMS = {"attention_memory": "FlashAttention 10-640x less attention memory"}
# Eager makes each of scaled, masked and softmaxed scores as a new tensor from the previous one, so two or three
# score-sized tensors are alive at once.
EAGER_LIVE_SCORE_TENSORS = 3
MEMORY_SAFETY_FRACTION = 0.7
WARMUP_TOKENS = 128


def eager_score_bytes(config, query_length: int, key_length: int, itemsize: int = 4) -> int:
    """Bytes of one layer's attention-score tensor in eager attention (batch 1)."""
    return config.num_attention_heads * query_length * key_length * itemsize


def available_memory_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return _proc_kib("/proc/meminfo", "MemAvailable") * 1024


def _proc_kib(path: str, field: str) -> int:
    """A ``field: N kB`` line of a /proc file, in KiB."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{path} has no {field}")


def skip_reason(backend: str, config, context: int, chunk_size: int | None, device: str) -> str | None:
    """Why a configuration cannot run here, or None."""
    from transformers.utils import is_flash_attn_2_available

    if backend == "flash_attention_2":
        if not device.startswith("cuda"):
            return "flash_attention_2 needs a CUDA device"
        if not is_flash_attn_2_available():
            return "flash_attn is not installed"
    if backend == "eager":
        query_length = min(chunk_size or context, context)
        needed = EAGER_LIVE_SCORE_TENSORS * eager_score_bytes(config, query_length, context)
        available = available_memory_bytes(device)
        if needed > MEMORY_SAFETY_FRACTION * available:
            return (
                f"eager scores need ~{needed / 2**30:.1f} GiB ({EAGER_LIVE_SCORE_TENSORS} x {config.num_attention_heads} "
                f"heads x {query_length} x {context} fp32) but only {available / 2**30:.1f} GiB is available"
            )
    return None


def _build_config(preset: str, backend: str, context: int, num_layers: int | None = None):
    from ..presets import load_preset

    overrides = {"num_hidden_layers": num_layers} if num_layers else {}
    config = load_preset(preset, max_position_embeddings=max(context + 1, WARMUP_TOKENS + 1), **overrides)
    config._attn_implementation = backend
    return config


def prefill_once(
    preset: str, backend: str, context: int, chunk_size: int | None, device: str, num_layers: int | None = None, seed=0
) -> dict:
    """Time and peak extra memory of one prefill; on CPU, only in a process where
    ``_return_freed_tensor_memory_to_os`` ran first."""
    import torch
    from transformers import GenerationConfig

    from ..modeling_kvtrade import KVTradeForCausalLM

    config = _build_config(preset, backend, context, num_layers)
    on_cuda = device.startswith("cuda")
    # flash_attention_2 needs half precision; on CUDA every backend runs in it so that the rows compare.
    dtype = torch.bfloat16 if on_cuda else torch.float32
    torch.manual_seed(seed)
    model = KVTradeForCausalLM(config).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, config.vocab_size, (1, context), generator=generator).to(device)
    generation_config = GenerationConfig(
        max_new_tokens=1, do_sample=False, prefill_chunk_size=chunk_size, pad_token_id=config.pad_token_id
    )

    def prefill(input_ids):
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation_config)

    with torch.inference_mode():
        prefill(prompt[:, :WARMUP_TOKENS])
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _proc_kib("/proc/self/status", "VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")
        synchronize = torch.cuda.synchronize if on_cuda else None
        [seconds] = time_calls(lambda: prefill(prompt), 1, warmup=0, synchronize=synchronize)
        peak = torch.cuda.max_memory_allocated() if on_cuda else _proc_kib("/proc/self/status", "VmHWM") * 1024
    return {"prefill_s": seconds, "peak_extra_mib": (peak - before) / 2**20, "dtype": str(dtype).removeprefix("torch.")}


def _return_freed_tensor_memory_to_os() -> None:
    """Makes RSS track live tensors on glibc (see the module docstring); raises where that cannot be arranged."""
    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("peak memory on CPU needs Linux /proc (clear_refs and status)")
    m_mmap_threshold = -3  # from glibc's malloc.h
    if ctypes.CDLL(ctypes.util.find_library("c")).mallopt(m_mmap_threshold, 64 * 1024) != 1:
        raise RuntimeError("glibc mallopt(M_MMAP_THRESHOLD) failed: peak RSS would include malloc's retained heap")


def measure(
    preset="small", contexts=FULL_CONTEXTS, backends=BACKENDS, chunk_size=2048, num_layers=None, device=None, seed=0
) -> dict:
    """One row per (backend, context, one-shot | chunked); skipped rows carry ``skipped`` with the reason.

    ``memory_vs_eager`` and ``speedup_vs_eager`` compare a one-shot row with eager one-shot at its context,
    ``chunked_memory_reduction`` a chunked row with its backend's one-shot row. ``num_layers`` overrides the preset's.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = dict(preset=preset, contexts=contexts, backends=backends, chunk_size=chunk_size)
    settings.update(num_layers=num_layers, device=device, seed=seed)
    if device.startswith("cuda"):
        rows = _measure_rows(**settings)
    else:  # a fresh worker, whose malloc settings must not leak into the caller's timings
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as worker:
            rows = worker.submit(_measure_rows, **settings).result()
    _add_ratios(rows)
    return {
        "benchmark": "attention",
        "preset": preset,
        "num_layers": num_layers or _build_config(preset, "sdpa", max(contexts)).num_hidden_layers,
        "memory_method": "cuda max_memory_allocated" if device.startswith("cuda") else "peak RSS (VmHWM), mmap threshold 64 KiB",
        "seed_claims": SEED_CLAIMS,
        "rows": rows,
    }


def _measure_rows(preset, contexts, backends, chunk_size, num_layers, device, seed) -> list[dict]:
    if not device.startswith("cuda"):
        _return_freed_tensor_memory_to_os()
    machine = machine_info(device)
    rows = []
    for context in contexts:
        for backend in backends:
            # A context that fits in one chunk has no chunked row: it would repeat the one-shot run.
            for mode_chunk in (None, chunk_size) if chunk_size < context else (None,):
                config = _build_config(preset, backend, context, num_layers)
                row = {
                    "backend": backend,
                    "context": context,
                    "mode": "one-shot" if mode_chunk is None else f"chunked({mode_chunk})",
                    "prefill_chunk_size": mode_chunk,
                    "eager_scores_mib_per_layer": eager_score_bytes(config, mode_chunk or context, context) / 2**20,
                    "machine": machine,
                }
                if reason := skip_reason(backend, config, context, mode_chunk, device):
                    row["skipped"] = reason
                else:
                    row.update(prefill_once(preset, backend, context, mode_chunk, device, num_layers, seed))
                rows.append(row)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    measured = {(row["backend"], row["context"], row["mode"]): row for row in rows if "skipped" not in row}
    for (backend, context, mode), row in measured.items():
        if mode == "one-shot":
            eager = measured.get(("eager", context, "one-shot"))
            if eager:
                row["memory_vs_eager"] = row["peak_extra_mib"] / eager["peak_extra_mib"]
                row["speedup_vs_eager"] = eager["prefill_s"] / row["prefill_s"]
        else:
            one_shot = measured.get((backend, context, "one-shot"))
            if one_shot:
                row["chunked_memory_reduction"] = one_shot["peak_extra_mib"] / row["peak_extra_mib"]


def add_arguments(parser) -> None:
    add_common_arguments(parser, "attention", quick=f"{QUICK_LAYERS} decoder layer and contexts {QUICK_CONTEXTS} only")
    parser.add_argument("--contexts", type=context_list, help=f"comma-separated prompt lengths (default: {FULL_CONTEXTS})")
    parser.add_argument("--preset", default="small", help="model shape (default: %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=2048, help="prefill_chunk_size of the chunked rows")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def run(args) -> int:
    result = measure(
        preset=args.preset,
        contexts=args.contexts or (QUICK_CONTEXTS if args.quick else FULL_CONTEXTS),
        chunk_size=args.chunk_size,
        num_layers=QUICK_LAYERS if args.quick else None,
        device=args.device,
    )
    print(markdown(result))
    print(f"wrote {write_json(args.json, result)}")
    return 0


def markdown(result: dict) -> str:
    columns = {
        "backend": "backend", "context": "context", "mode": "mode", "prefill s": "prefill_s",
        "peak extra MiB": "peak_extra_mib",
        "memory vs eager": lambda row: row.get("memory_vs_eager", row.get("chunked_memory_reduction")),
        "skipped": "skipped",
    }
    return markdown_table("Attention backends at long context (prefill)", columns, result["rows"], {})
