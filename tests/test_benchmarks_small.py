"""Smoke tests of the gqa, attention and attention_map benchmarks at tiny sizes: structure and byte invariants only.

Timings are never asserted: the benchmarks report them side by side, and their ratios are read in the report.
"""

import argparse
import json

import numpy as np
import pytest

from hf_kvtrade import Forecaster
from hf_kvtrade.benchmarks import _common, attention, attention_map, gqa
from hf_kvtrade.cli import main
from hf_kvtrade.presets import load_preset

MACHINE_KEYS = {"cpu", "cores", "torch", "transformers", "device"}


def test_common_helpers(tmp_path):
    durations = _common.time_calls(lambda: None, repeats=4, warmup=1)
    assert len(durations) == 4 and all(seconds >= 0 for seconds in durations)
    assert _common.percentile_ms([0.001, 0.002, 0.003], 50) == pytest.approx(2.0)
    path = _common.write_json(tmp_path / "nested" / "out.json", {"rows": [1]})
    assert json.loads(path.read_text()) == {"rows": [1]}
    assert MACHINE_KEYS <= set(_common.machine_info("cpu"))
    assert _common.context_list("1024,4096") == (1024, 4096)
    with pytest.raises(argparse.ArgumentTypeError, match="positive"):
        _common.context_list("0,8")


def test_gqa_cache_bytes_follow_kv_heads():
    result = gqa.measure(preset="tiny", contexts=(16, 48), decode_steps=2)
    config = load_preset("tiny")
    assert [(row["context"], row["attention"]) for row in result["rows"]] == [
        (context, flavour) for context in (16, 48) for flavour in ("mha", "gqa", "mqa")
    ]
    for row in result["rows"]:
        # keys + values, every layer, fp32
        expected = 2 * config.num_hidden_layers * row["num_key_value_heads"] * config.head_dim * 4
        assert row["cache_bytes_per_token"] == expected
        assert row["cache_reduction_vs_mha"] == config.num_attention_heads / row["num_key_value_heads"]
        assert row["decode_p50_ms"] > 0 and row["decode_speedup_vs_mha"] > 0
        assert MACHINE_KEYS <= set(row["machine"])
    assert {row["num_key_value_heads"] for row in result["rows"]} == {4, 2, 1}


def test_attention_rows_skips_and_score_memory():
    result = attention.measure(preset="tiny", contexts=(96, 512), chunk_size=128, num_layers=1)
    rows = {(row["backend"], row["context"], row["mode"]): row for row in result["rows"]}
    # A context within one chunk has no chunked row; flash_attention_2 needs CUDA.
    assert ("eager", 96, "chunked(128)") not in rows
    assert set(rows) >= {("eager", 512, "one-shot"), ("eager", 512, "chunked(128)"), ("sdpa", 512, "chunked(128)")}
    assert all("CUDA" in row["skipped"] for key, row in rows.items() if key[0] == "flash_attention_2")
    eager = rows[("eager", 512, "one-shot")]
    # Eager materialises heads x 512 x 512 fp32 scores: the measured peak cannot be below one such tensor.
    assert eager["eager_scores_mib_per_layer"] == 4 * 512 * 512 * 4 / 2**20
    assert eager["peak_extra_mib"] >= eager["eager_scores_mib_per_layer"]
    assert rows[("eager", 512, "chunked(128)")]["eager_scores_mib_per_layer"] == 4 * 128 * 512 * 4 / 2**20
    assert rows[("sdpa", 512, "one-shot")]["memory_vs_eager"] > 0
    assert rows[("sdpa", 512, "chunked(128)")]["chunked_memory_reduction"] > 0
    assert result["num_layers"] == 1
    assert all(MACHINE_KEYS <= set(row["machine"]) for row in rows.values())


def test_eager_that_cannot_fit_is_skipped_with_reason():
    config = load_preset("small", max_position_embeddings=2**20)
    reason = attention.skip_reason("eager", config, 2**19, None, "cpu")
    assert "GiB" in reason and "eager scores" in reason
    assert attention.skip_reason("sdpa", config, 2**19, None, "cpu") is None


@pytest.fixture
def tiny_checkpoint(tmp_path, make_tiny_model):
    """A tiny model with a 24-token policy window, saved as a checkpoint folder."""
    path = tmp_path / "tiny"
    Forecaster(make_tiny_model(training_context_length=24)).save_pretrained(path)
    return path


def test_attention_map_is_causal_and_normalised(tmp_path, tiny_checkpoint):
    result = attention_map.measure(tiny_checkpoint, "sp500", out_dir=tmp_path)
    assert result["source"] == f"checkpoint {tiny_checkpoint}"
    attention_map_ = result["map"]
    # The policy's context of the whole series for a one-bar forecast: at most the window less one.
    assert 12 <= attention_map_.shape[0] <= 23 and attention_map_.shape[0] == attention_map_.shape[1]
    np.testing.assert_allclose(attention_map_.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(np.triu(attention_map_, k=1) == 0)
    np.testing.assert_allclose(result["weights_by_lag"], attention_map_[-1, ::-1])
    assert result["mass_within_last"]["20"] <= result["mass_within_last"]["60"] == pytest.approx(1.0)
    assert (tmp_path / "attention_map.png").stat().st_size > 0


def test_benchmarks_refuse_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*none"):
        attention_map.measure(tmp_path / "none", "sp500")


def test_bench_cli_writes_json(tmp_path, tiny_checkpoint):
    main(["bench", "gqa", "--json", str(tmp_path / "gqa.json"), "--preset", "tiny", "--contexts", "16", "--quick"])
    assert len(json.loads((tmp_path / "gqa.json").read_text())["rows"]) == 3
    main(["bench", "attention_map", "--out", str(tmp_path), "--checkpoint", str(tiny_checkpoint)])
    summary = json.loads((tmp_path / "attention_map.json").read_text())
    assert len(summary["weights_by_lag"]) == summary["context_length"] <= 23 and "map" not in summary


def test_batch_bench_runs_both_paths_on_the_same_sessions(tmp_path, tiny_checkpoint):
    from hf_kvtrade.benchmarks import batch

    path = tmp_path / "batch.json"
    args = argparse.Namespace(
        json=str(path), checkpoint=str(tiny_checkpoint), symbols=[1, 3], rounds=2, history=12, threads=1, quick=False
    )
    assert batch.run(args) == 0
    report = json.loads(path.read_text())
    assert set(report["results"]) == {"1", "3"} and report["rounds"] == 2
    three = report["results"]["3"]
    assert 6 <= three["history_bars"][0] <= three["history_bars"][1] <= 12
    # 2 layers x (K + V) x 2 KV heads x 32 dims x 4 bytes = 1 KiB per token, for the 24-token window of each slot:
    # the sessions' slot pool doubled from 2 to 4 slots for the third session, and counts all it allocated.
    assert three["cache_bytes"] == 4 * 1024 * 24
    assert three["batched_ticks_per_s"] > 0 and three["sequential_ticks_per_s"] > 0
    assert report["target"] == {"symbols": 64, "speedup": 8.0, "verdict": None}
    assert MACHINE_KEYS <= set(report["machine"])


def test_cache_bench_scores_every_policy_in_nats_per_bar(tmp_path, tiny_checkpoint):
    """`kvtrade bench cache` end to end with a tiny window (24 tokens), through the code the defaults run."""
    out = tmp_path / "cache.json"
    main(["bench", "cache", "--checkpoint", str(tiny_checkpoint), "--series", "sp500", "--json", str(out)])
    result = json.loads(out.read_text())
    window, long_stream = result["window"], result["long_stream"]
    assert set(window) == {"full", "int8", "int4", "sink", "selective"} and result["bounded_budget_tokens"] == 6
    # The full cache, rebased by the policy, is the context-policy forecast of `kvtrade evaluate`.
    assert window["full"]["max_abs_nll_gap_to_context_policy_forecast"] < 1e-4
    assert window["full"]["nll_change"] == 0.0 and window["full"]["tokens_held"] == 23
    for policy in ("sink", "selective"):
        assert window[policy]["tokens_held"] == 6
        assert window[policy]["bytes_held"] < window["full"]["bytes_held"] / 3
    for policy, row in window.items():
        assert row["edge"] == pytest.approx(window["full"]["edge"])
        assert np.isfinite(row["nll_change"]) and row["p50_ms"] > 0
        assert ("target" in row) == (policy != "full")
        if row["share_of_edge"] is not None:
            assert row["share_of_edge"] == pytest.approx(row["nll_change"] / row["edge"])
            assert row["target"]["met"] == (row["share_of_edge"] <= row["target"]["limit"])
    assert long_stream["stream_ticks_before_first_scored_bar"] == 8 * 24 and long_stream["series"] == ["sp500"]
    assert long_stream["tokens_held"] == 6 and np.isfinite(long_stream["nll_change"])
    assert MACHINE_KEYS <= set(result["machine"])


def test_orderbook_bench_replays_the_capture_through_both_caches(tmp_path):
    """`kvtrade bench orderbook` end to end on the shipped order-book model, over the capture's first events."""
    out = tmp_path / "orderbook.json"
    assert main(["bench", "orderbook", "--limit-events", "8000", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["order_events"] == 8000 and result["peak_live_events_per_s"] > 0
    int8, full = result["rows"]["analyzer, int8 cache"], result["rows"]["analyzer, full cache"]
    assert int8["ticks"] == full["ticks"] > 0
    # int8 codes plus per-token scales hold fewer bytes than fp32 keys and values of the same tokens.
    assert 0 < int8["cache_bytes"] < full["cache_bytes"]
    assert result["int8_vs_full_max_prob_difference"] < 0.05
    assert result["target_met"] == (result["headroom"] >= result["target_headroom"])
    assert MACHINE_KEYS <= set(result["machine"])
