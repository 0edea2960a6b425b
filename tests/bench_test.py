"""The benchmark runs and reports both sides (a smoke test: speed is reported, never asserted)."""

import numpy as np
import pytest

from tests.helpers import resolved, tiny_config
from trainer.benchmarks.timing import host_cpu, timed_rounds
from trainer.benchmarks.train_step import bench, flops_per_token


@pytest.mark.slow
def test_bench_reports_ours_and_the_torch_reference():
    # 8 virtual devices, data-parallel; two rounds of each side
    row = bench(resolved(tiny_config()), batch=8, seq=16, steps=1, vocab=64, rounds=2)
    assert row["ours_tokens_per_s"] > 0 and row["torch_tokens_per_s"] > 0 and row["ratio_vs_torch"] > 0
    assert row["mfu"] is None  # no peak FLOP/s for CPUs
    assert row["cpu"] == host_cpu() and " cores" in row["cpu"]  # a CPU ratio holds for its machine only
    rounds = row["seconds_per_round"]
    assert row["rounds"] == 2 and all(len(s) == 2 for s in rounds.values()), rounds
    # the ratio is the median of the rounds' own ratios (both sides timed on the same minutes)
    assert row["ratio_vs_torch"] == pytest.approx(np.median(np.divide(rounds["torch"], rounds["ours"])))
    assert row["ours_tokens_per_s"] == pytest.approx(8 * 16 / np.median(rounds["ours"]))


def test_timed_rounds_take_turns_in_alternating_order():
    calls = []

    def side(name):
        def timed():
            calls.append(name)
            return float(len(calls))
        return timed

    out = timed_rounds({"a": (0.5, side("a")), "b": (0.25, side("b")), "c": (0.125, side("c"))}, 3)
    assert calls == ["c", "b", "a", "a", "b", "c"]  # round 1 was each side's first timing
    assert out == {"a": [0.5, 3.0, 4.0], "b": [0.25, 2.0, 5.0], "c": [0.125, 1.0, 6.0]}
    assert timed_rounds({"a": (0.5, side("a"))}, 1) == {"a": [0.5]} and len(calls) == 6


def test_flops_per_token_counts_matmuls_and_attention():
    from trainer.models.config import ModelConfig  # noqa: PLC0415
    cfg = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=2)
    # q, o: 4x2x2 each; k, v: 4x1x2 each; gated MLP 3 x 4x8; head 4x10 -> 184 matmul parameters;
    # causal attention: 12 x layers x heads x head_dim x seq / 2
    assert flops_per_token(cfg, 8) == 6 * 184 + 12 * 1 * 2 * 2 * 8 / 2


def test_generation_benchmark_runs_both_sides_with_identical_tokens(capsys, tmp_path, monkeypatch):
    import tempfile  # noqa: PLC0415

    from trainer.benchmarks.generation import bench as bench_generate  # noqa: PLC0415
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # this process's temp directory and the reference's
    monkeypatch.setattr(tempfile, "tempdir", None)
    (row,) = bench_generate("demo", batches=(4,), prompt_len=24, new_tokens=6, num_batches=2, rounds=2,
                            split=True)
    # the random-weight model's files are gone (each SmolLM2 run left 514 MB)
    assert list(tmp_path.glob("bench_generate_*")) == []
    assert row["ours_tokens_per_s"] > 0 and row["torch_tokens_per_s"] > 0
    assert row["identical_rows"] == row["rows"] == 8  # greedy tokens equal transformers.generate's
    # two rounds each side, the ratio the median of the rounds' own ratios
    rounds = row["seconds_per_round"]
    assert len(rounds["ours"]) == len(rounds["torch"]) == row["rounds"] == 2
    assert row["ratio"] == pytest.approx(np.median(np.asarray(rounds["torch"]) / np.asarray(rounds["ours"])))
    out = capsys.readouterr().out
    assert "ratio" in out and f"host CPU: {row['cpu']}" in out
    # --split: the one-token runs take turns in the same rounds; a batch's time is its prefill and
    # first token, then 5 decode steps (2 batches a round)
    assert len(rounds["ours_one_token"]) == len(rounds["torch_one_token"]) == 2
    split = row["split"]
    for side in ("ours", "torch"):
        whole = np.median(rounds[side]) / 2
        assert split[side]["prefill_s"] == pytest.approx(np.median(rounds[f"{side}_one_token"]) / 2)
        assert split[side]["prefill_s"] + 5 * split[side]["decode_step_ms"] / 1e3 == pytest.approx(whole)
    assert split["ours"]["prefill_s"] + 5 * split["decode_step_ms_for_2x"] / 1e3 == pytest.approx(
        np.median(rounds["torch"]) / 2 / 2)
    assert "each further token" in out


def test_loss_benchmark_times_both_sides_and_their_gradients_agree():
    from trainer.benchmarks import loss as loss_bench
    r = loss_bench.run(batch=2, seq=64, embed=16, vocab=300, chunk=32, supervised=0.5, softcap=0.0,
                       dtype="float32", repeats=1)
    assert r["ours"]["seconds"] > 0 and r["reference"]["seconds"] > 0 and r["speedup"] > 0
    assert r["max_grad_difference"] < 1e-5
    # the reference holds [batch, seq, vocab] float32 logits; ours a [batch, 16, vocab] tile
    assert r["ours"]["temporary_bytes"] < r["reference"]["temporary_bytes"]


def test_the_tunix_comparison_refuses_a_model_that_is_not_llama_shaped():
    import dataclasses  # noqa: PLC0415

    from trainer.benchmarks.tunix_step import llama_shaped  # noqa: PLC0415 (imports no Tunix)
    from trainer.models.config import ModelConfig  # noqa: PLC0415
    base = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    assert llama_shaped(base) == ""
    assert llama_shaped(dataclasses.replace(base, qkv_bias=True)) == "biases"
    assert llama_shaped(dataclasses.replace(base, final_logit_softcap=30.0, norm="layer")) == "LayerNorm, softcapping"


def test_bench_times_tunix_beside_ours_when_the_bench_extra_is_installed():
    """A smoke run of ``trainer.bench --tunix`` (``launch/tunix_bench.sh`` installs Tunix; CI does not)."""
    pytest.importorskip("tunix.sft.peft_trainer", reason="the bench-only extra (launch/tunix_bench.sh)")
    row = bench(resolved(tiny_config()), batch=8, seq=16, steps=1, vocab=64, use_torch=False, tunix=True,
                rounds=2)
    assert row["tunix_tokens_per_s"] > 0 and row["ratio_vs_tunix"] > 0 and row["ratio_vs_tunix_glibc"] > 0
    assert {k: len(v) for k, v in row["seconds_per_round"].items()} == {"ours": 2, "tunix": 2, "tunix_glibc": 2}
    assert row["tunix_build_s"] > 0 and row["ours_first_step_s"] > 0


def test_attention_kernel_benchmark_counts_the_pairs_within_segments():
    """Useful FLOPs: two 2-token segments hold 2 x 2 causal pairs, one 4-token segment 8 -- 14 matmul
    FLOPs a pair per head dimension (2 x (2 forward + 5 backward passes)); the XLA row runs on CPU."""
    from trainer.benchmarks import attention_kernels  # noqa: PLC0415
    assert attention_kernels.useful_flops([[1, 1, 2, 2]], heads=1, head_dim=1) == 14 * 4
    assert attention_kernels.useful_flops([[1, 1, 1, 1]], heads=1, head_dim=1) == 14 * 8
    rows = attention_kernels.run(batch=1, seq=128, heads=2, kv_heads=1, head_dim=16, repeats=1)
    assert [r["variant"] for r in rows] == ["xla"] and rows[0]["ms"] > 0


@pytest.mark.parametrize("keep", [False, True])
def test_the_torch_reference_runs_in_a_process_of_its_own_with_its_own_malloc_settings(keep):
    """One heap per side: in ours' process PyTorch's frees trimmed the pages ours keeps, or, spared its
    trims, PyTorch ran faster than it does on its own (``trainer/benchmarks/torch_reference.py``)."""
    import os  # noqa: PLC0415

    from trainer import host_memory  # noqa: PLC0415
    from trainer.benchmarks.torch_reference import TorchProcess  # noqa: PLC0415
    tiny = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    ref = TorchProcess(tiny, (3, 2, 8, 64), warmup=2, lr=1e-3, dtype="float32", keep_freed_memory=keep)
    try:
        assert ref.first["pid"] != os.getpid() and ref.first["seconds"] > 0 and ref.timed() > 0
        assert ref.first["kept_memory"] is (keep and host_memory._glibc() is not None and host_memory.cpu_only())
    finally:
        ref.close()
