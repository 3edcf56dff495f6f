"""`dlmstudy bench`: records on CPU, the MFU formula against the measured H200 anchor, configs and errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dlmstudy.cli import main
from dlmstudy.errors import UserError
from dlmstudy.models.backbones import build_config
from dlmstudy.runners.bench import (BENCH_CONFIGS, bench_config, flops_per_token, matmul_params, mfu, peak_flops,
                                    sampling_grid)

FIELDS = {"device", "device_name", "config", "arm", "objective", "batch", "seq_len", "tokens_per_s", "step_time_s",
          "mfu", "peak_memory_gb", "params_total", "params_non_embedding", "torch", "transformers", "date"}


@pytest.mark.slow
def test_bench_cpu_tiny_writes_one_training_record_per_arm(tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "out.json"
    assert main(["bench", "--device", "cpu", "--config", "tiny", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert all(FIELDS <= set(r) for r in records)
    train = [r for r in records if r["measurement"] == "train"]
    assert sorted((r["arm"], r["objective"]) for r in train) == [("llada", "mdm"), ("qwen", "ar")]
    for r in train:
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["device"] == "cpu"
        assert r["mfu"] is None  # no peak on CPU
        assert (r["batch"], r["seq_len"]) == (4, 32)
        assert 0 < r["params_non_embedding"] < r["params_total"]
    sample = [r for r in records if r["measurement"] == "sample"]
    assert {r["arm"] for r in sample} == {"llada"}  # the diffusion sampler belongs to the MDM arm
    assert {r["mode"] for r in sample} == {"plain", "cached", "parallel", "compiled", "parallel-compiled"}
    for r in sample:
        assert r["tokens_per_s"] > 0
        assert (r["same_tokens_as_eager"] == 1.0) if "compiled" in r["mode"] else r["same_tokens_as_eager"] is None
        blocks = r["gen_length"] // r["block_length"]
        if "parallel" in r["mode"]:
            assert blocks <= r["forward_passes"] <= r["gen_length"]  # at least one token committed per pass
        else:
            assert r["forward_passes"] == r["steps"]
    decode = [r for r in records if r["measurement"] == "ar_decode"]
    assert [(r["arm"], r["mode"], r["forward_passes"]) for r in decode] == [
        ("qwen", "hf_generate", 8), ("qwen", "kv_cache", 8), ("qwen", "static_compiled", 8)]
    assert all(r["tokens_per_s"] > 0 for r in decode) and decode[2]["same_tokens_as_eager"] == 1.0
    assert "tokens/s" in capsys.readouterr().out


def test_profile_writes_an_operator_table_per_training_record(tmp_path):
    out = tmp_path / "out.json"
    assert main(["bench", "--device", "cpu", "--config", "tiny", "--arms", "qwen", "--measure", "train",
                 "--steps", "1", "--warmup", "0", "--profile", str(tmp_path / "prof"), "--json", str(out)]) == 0
    [record] = json.loads(out.read_text())
    table = (tmp_path / "prof" / "tiny-qwen-plain.txt").read_text()
    assert record["profile"] == str(tmp_path / "prof" / "tiny-qwen-plain.txt")
    assert "aten::mm" in table and "Optimizer.step" in table  # the step's matmuls and the optimizer were profiled


def seed_model(vocab_size: int) -> torch.nn.Module:
    cfg = dataclasses.replace(BENCH_CONFIGS["seed-100m"], vocab_size=vocab_size)
    tokens = dataclasses.replace(cfg.tokens, pad_token_id=0, eos_token_id=1, mask_token_id=2)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(build_config("llada", cfg.size, tokens, causal=True))


def test_mfu_reproduces_the_measured_h200_anchor():
    """Plain transformers on an H200: seed-shaped AR at 303k tok/s is 16.9% MFU (vocab 126,464), 268k 17.3% (152k)."""
    model = seed_model(126464)
    d, layers, mlp = 448, 6, 768
    assert matmul_params(model) == 126464 * d + layers * (4 * d * d + 3 * d * mlp)  # head counted, embedding not
    flops = flops_per_token(matmul_params(model), layers, d, 1024)
    assert mfu(303e3, flops, 788e12) == pytest.approx(0.169, abs=5e-4)
    flops_qwen_vocab = flops_per_token(matmul_params(seed_model(152064)), layers, d, 1024)
    assert mfu(268e3, flops_qwen_vocab, 788e12) == pytest.approx(0.173, abs=5e-4)
    assert mfu(303e3, flops, None) is None


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 788e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("Ascend910B3", 313e12), ("Intel(R) Xeon(R) Processor", None)])
def test_peak_table(name, peak):
    assert peak_flops(name)[0] == peak


def test_config_json_gives_the_shape_and_overrides_apply(tmp_path):
    qwen = {"model_type": "qwen2", "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3,
            "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 500, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    cfg = bench_config(str(tmp_path / "config.json"), batch_size=2)
    assert (cfg.size.hidden_size, cfg.size.num_layers, cfg.size.num_heads, cfg.size.num_kv_heads) == (96, 3, 6, 2)
    assert (cfg.size.intermediate_size, cfg.size.tie_word_embeddings, cfg.vocab_size) == (256, True, 500)
    assert (cfg.batch_size, cfg.seq_len, cfg.tokens.mask_token_id) == (2, 512, 499)
    assert bench_config("tiny", seq_len=4096).size.max_position_embeddings == 4096


def test_sampling_grid_holds_only_settings_the_sampler_accepts():
    cfg = dataclasses.replace(BENCH_CONFIGS["small"], sample_steps=(128, 32, 6), block_lengths=(128, 32, 48))
    grid = sampling_grid(cfg)
    for mode, steps, block in grid:
        assert cfg.gen_length % block == 0 and steps % (cfg.gen_length // block) == 0
    assert sorted({b for _, _, b in grid}) == [32, 128]
    assert [(m, b) for m, _, b in grid if m == "parallel"] == [("parallel", 128), ("parallel", 32)]


def test_bad_bench_input_is_a_user_error(capsys):
    with pytest.raises(UserError, match="bench config 'huge'"):
        bench_config("huge")
    assert main(["bench", "--device", "cpu", "--config", "huge"]) == 2
    assert main(["bench", "--device", "cpu", "--arms", "nope"]) == 2
    assert main(["bench", "--device", "cpu", "--steps", "0"]) == 2
    assert "dlmstudy: error:" in capsys.readouterr().err
