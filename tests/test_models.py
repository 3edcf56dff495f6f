"""Models: LLaDA / Qwen2 configs, parameter counts and matching, local checkpoints, arms, attention direction."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen2Config

from dlmstudy.errors import UserError
from dlmstudy.models.backbones import ModelSize, SpecialTokens, build_config, build_model
from dlmstudy.models.checkpoints import detect_layout, load_pretrained, save_checkpoint
from dlmstudy.models.llada import (hf_name, llada_config_from_json, llada_json_from_config, llada_name,
                                   llada_state_dict_to_hf)
from dlmstudy.models.matching import AspectRule, check_match, match_arms, solve_size, split_overrides
from dlmstudy.models.params import count_config, count_model, count_size, describe_config, format_counts
from dlmstudy.models.qwen import hf_config_from_json, qwen2_config_from_json
from dlmstudy.models.registry import ARMS, Arm, get_arm

SHARED = Path(__file__).resolve().parents[2] / "shared"
SEED = SHARED / "seed" / "configs"


def needs_shared(test):
    """Mark a test that reads ../shared (the seed configs, the Qwen2 tokenizer); skipped without it."""
    return pytest.mark.shared(pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared")(test))


TOKENS = SpecialTokens(vocab_size=64, pad_token_id=0, eos_token_id=1, mask_token_id=2)
TINY = ModelSize(hidden_size=32, num_layers=2, num_heads=4)

# The seed's llada-100M config.json, every key as in the file.
SEED_LLADA = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 448,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 1024, "mlp_hidden_size": 768,
    "mlp_ratio": 2, "model_type": "llada", "multi_query_attention": None, "n_heads": 7, "n_kv_heads": 7,
    "n_layers": 6, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
    "rope": True, "rope_full_precision": True, "rope_theta": 10000.0, "scale_logits": False,
    "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 126464, "weight_tying": False,
}


def tiny_llada(**changes) -> dict:
    """The seed's keys at toy size: GQA (4 heads, 2 kv), embedding rows (64) above vocab_size (60)."""
    return {**SEED_LLADA, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden_size": 48,
            "vocab_size": 60, "embedding_size": 64, "rope_theta": 500000.0, "max_sequence_length": 64,
            "mask_token_id": 59, "eos_token_id": 58, "pad_token_id": 58, **changes}


def tiny_qwen2(**changes) -> dict:
    """A Qwen2.5-style config.json at toy size."""
    return {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 1,
            "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48,
            "max_position_embeddings": 64, "max_window_layers": 2, "model_type": "qwen2", "num_attention_heads": 4,
            "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "sliding_window": 64, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
            "use_sliding_window": False, "vocab_size": 64, **changes}


# ---------------------------------------------------------------- an independent reference forward pass

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on (heads, T, head_dim), halves rotated (Llama / LLaDA convention)."""
    hd, T = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()


def reference_logits(ids: list[int], p: dict, *, heads: int, kv_heads: int, theta: float, eps: float,
                     causal: bool) -> torch.Tensor:
    """Logits (T, V) of a pre-norm RoPE transformer with SwiGLU, from plain tensors, in float64."""
    p = {k: [{n: t.double() for n, t in b.items()} for b in v] if k == "blocks" else v.double() for k, v in p.items()}
    x = p["emb"][torch.tensor(ids)]
    T = len(ids)
    for b in p["blocks"]:
        h = rms_norm(x, b["attn_norm"], eps)
        q, k, v = (h @ b[w].T + b.get(w + "_bias", 0) for w in ("q", "k", "v"))
        hd = q.shape[-1] // heads
        q = rotate(q.view(T, heads, hd).transpose(0, 1), theta)
        k = rotate(k.view(T, kv_heads, hd).transpose(0, 1), theta).repeat_interleave(heads // kv_heads, 0)
        v = v.view(T, kv_heads, hd).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, heads * hd)
        x = x + attn @ b["o"].T
        h = rms_norm(x, b["ff_norm"], eps)
        x = x + (F.silu(h @ b["gate"].T) * (h @ b["up"].T)) @ b["down"].T
    return rms_norm(x, p["final_norm"], eps) @ p["head"].T


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], *, shards: int = 2) -> None:
    """safetensors shards plus model.safetensors.index.json, as hub folders hold them."""
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def llada_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under LLaDA's original names for a LLaDA config."""
    g = torch.Generator().manual_seed(seed)
    d, hd = cfg["d_model"], cfg["d_model"] // cfg["n_heads"]
    kv, ff, rows = cfg["n_kv_heads"] * hd, cfg["mlp_hidden_size"], cfg["embedding_size"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    t = {"model.transformer.wte.weight": r(rows, d), "model.transformer.ln_f.weight": 1 + r(d)}
    if not cfg["weight_tying"]:
        t["model.transformer.ff_out.weight"] = r(rows, d)
    for i in range(cfg["n_layers"]):
        b = f"model.transformer.blocks.{i}."
        t |= {b + "q_proj.weight": r(d, d), b + "k_proj.weight": r(kv, d), b + "v_proj.weight": r(kv, d),
              b + "attn_out.weight": r(d, d), b + "ff_proj.weight": r(ff, d), b + "up_proj.weight": r(ff, d),
              b + "ff_out.weight": r(d, ff), b + "attn_norm.weight": 1 + r(d), b + "ff_norm.weight": 1 + r(d)}
    return t


def llada_reference(t: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    """Reference logits read straight from LLaDA-named tensors (ff_proj is the gate, bidirectional)."""
    blocks = []
    for i in range(cfg["n_layers"]):
        b = f"model.transformer.blocks.{i}."
        blocks.append({"attn_norm": t[b + "attn_norm.weight"], "q": t[b + "q_proj.weight"], "k": t[b + "k_proj.weight"],
                       "v": t[b + "v_proj.weight"], "o": t[b + "attn_out.weight"], "ff_norm": t[b + "ff_norm.weight"],
                       "gate": t[b + "ff_proj.weight"], "up": t[b + "up_proj.weight"], "down": t[b + "ff_out.weight"]})
    head = t["model.transformer.wte.weight"] if cfg["weight_tying"] else t["model.transformer.ff_out.weight"]
    params = {"emb": t["model.transformer.wte.weight"], "blocks": blocks, "final_norm": t["model.transformer.ln_f.weight"],
              "head": head}
    return reference_logits(ids, params, heads=cfg["n_heads"], kv_heads=cfg["n_kv_heads"], theta=cfg["rope_theta"],
                            eps=cfg["rms_norm_eps"], causal=False)


def qwen2_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under transformers' Qwen2 names, q/k/v biases included."""
    g = torch.Generator().manual_seed(seed)
    d, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    kv, ff, V = cfg["num_key_value_heads"] * hd, cfg["intermediate_size"], cfg["vocab_size"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    t = {"model.embed_tokens.weight": r(V, d), "model.norm.weight": 1 + r(d), "lm_head.weight": r(V, d)}
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        t |= {b + "self_attn.q_proj.weight": r(d, d), b + "self_attn.q_proj.bias": r(d),
              b + "self_attn.k_proj.weight": r(kv, d), b + "self_attn.k_proj.bias": r(kv),
              b + "self_attn.v_proj.weight": r(kv, d), b + "self_attn.v_proj.bias": r(kv),
              b + "self_attn.o_proj.weight": r(d, d), b + "mlp.gate_proj.weight": r(ff, d),
              b + "mlp.up_proj.weight": r(ff, d), b + "mlp.down_proj.weight": r(d, ff),
              b + "input_layernorm.weight": 1 + r(d), b + "post_attention_layernorm.weight": 1 + r(d)}
    return t


def qwen2_reference(t: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    blocks = []
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        blocks.append({"attn_norm": t[b + "input_layernorm.weight"], "ff_norm": t[b + "post_attention_layernorm.weight"],
                       **{w: t[f"{b}self_attn.{w}_proj.weight"] for w in "qkvo"},
                       **{w + "_bias": t[f"{b}self_attn.{w}_proj.bias"] for w in "qkv"},
                       **{w: t[f"{b}mlp.{w}_proj.weight"] for w in ("gate", "up", "down")}})
    params = {"emb": t["model.embed_tokens.weight"], "blocks": blocks, "final_norm": t["model.norm.weight"],
              "head": t["lm_head.weight"]}
    return reference_logits(ids, params, heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"],
                            theta=cfg["rope_theta"], eps=cfg["rms_norm_eps"], causal=True)


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


IDS = [3, 17, 42, 5, 59, 8, 23]


# ---------------------------------------------------------------- 1. configs

def test_llada_config_maps_every_key_onto_a_bidirectional_llama():
    c = llada_config_from_json(tiny_llada())
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == ("llama", 32, 2, 4)
    assert (c.num_key_value_heads, c.intermediate_size, c.head_dim) == (2, 48, 8)
    assert c.vocab_size == 64 and c.llada_vocab_size == 60  # embedding rows, token vocabulary
    assert c.is_causal is False and c.use_cache is False
    assert (c.mask_token_id, c.eos_token_id, c.pad_token_id, c.bos_token_id) == (59, 58, 58, None)
    assert c.rope_parameters["rope_theta"] == 500000.0 and c.rms_norm_eps == 1e-5
    assert c.max_position_embeddings == 64 and c.tie_word_embeddings is False
    assert not c.attention_bias and not c.mlp_bias


@needs_shared
def test_seed_llada_config_file_is_read_faithfully():
    assert json.loads((SEED / "llada-100M.config.json").read_text()) == SEED_LLADA  # the inline copy is exact
    c = llada_config_from_json(SEED / "llada-100M.config.json")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (448, 6, 7, 768)
    assert (c.vocab_size, c.mask_token_id, c.eos_token_id, c.is_causal) == (126464, 126336, 126081, False)


@pytest.mark.parametrize("key,value", [
    ("alibi", True), ("block_type", "sequential"), ("include_bias", True), ("include_qkv_bias", True),
    ("bias_for_layer_norm", True), ("layer_norm_type", "default"), ("activation_type", "swiglu"),
    ("rope", False), ("attention_layer_norm", True), ("scale_logits", True), ("input_emb_norm", True),
    ("residual_dropout", 0.1), ("embedding_dropout", 0.1), ("block_group_size", 2),
    ("layer_norm_with_affine", False), ("embedding_size", 32), ("n_kv_heads", 3), ("yarn", True),
])
def test_unsupported_llada_settings_are_user_errors_naming_the_key(key, value):
    with pytest.raises(UserError, match=key):
        llada_config_from_json(tiny_llada(**{key: value}))


def test_missing_llada_keys_take_llada_defaults_and_say_so():
    cfg = tiny_llada()
    del cfg["block_type"]  # LLaDA's default is the sequential block
    with pytest.raises(UserError, match="block_type.*LLaDA's default"):
        llada_config_from_json(cfg)
    cfg = tiny_llada(multi_query_attention=True, n_kv_heads=None)
    assert llada_config_from_json(cfg).num_key_value_heads == 1


def test_llada_config_round_trips_through_our_config():
    cfg = tiny_llada(weight_tying=True)
    back = llada_json_from_config(llada_config_from_json(cfg))
    assert {k: cfg[k] for k in back if k in cfg} == {k: back[k] for k in back if k in cfg}
    assert llada_config_from_json(back).to_dict() == llada_config_from_json(cfg).to_dict()
    with pytest.raises(UserError, match="qwen2"):
        llada_json_from_config(build_config("qwen", TINY, TOKENS, causal=False))


def test_qwen2_config_json_loads_through_transformers_qwen2config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_qwen2()))
    c = qwen2_config_from_json(tmp_path / "config.json")
    assert isinstance(c, Qwen2Config) and (c.hidden_size, c.num_key_value_heads, c.vocab_size) == (32, 2, 64)
    assert c.rope_parameters["rope_theta"] == 1000000.0
    with pytest.raises(UserError, match="gpt2"):
        hf_config_from_json(tiny_qwen2(model_type="gpt2"))
    with pytest.raises(UserError, match="llama"):
        qwen2_config_from_json(tiny_qwen2(model_type="llama"))
    with pytest.raises(UserError, match="not found"):
        qwen2_config_from_json(tmp_path / "absent.json")


@needs_shared
def test_seed_qwen_config_file_loads():
    c = qwen2_config_from_json(SEED / "qwen2.5-100M.config.json")
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size) == (448, 6, 768, 152064)


# ---------------------------------------------------------------- 2. parameter counts

def test_seed_llada_config_counts_the_tutorials_124m():
    counts = describe_config(SEED_LLADA)
    assert counts.as_dict() == {"total": 124_327_616, "embedding": 56_655_872, "output_head": 56_655_872,
                                "non_embedding": 11_015_872}
    text = format_counts(counts)
    assert "124327616" in text and "11015872" in text and "8.9%" in text


@needs_shared
def test_describe_config_reads_seed_files():
    assert describe_config(SEED / "llada-100M.config.json").total == 124_327_616
    # Qwen2: 152064·448 twice + 6 layers of (4·448² + 3·448 qkv bias + 3·448·768 + 2·448) + 448.
    q = describe_config(SEED / "qwen2.5-100M.config.json")
    assert (q.total, q.embedding, q.output_head, q.non_embedding) == (147_273_280, 68_124_672, 68_124_672, 11_023_936)


def test_describe_config_takes_a_model_folder_and_counts_tied_heads_once(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_llada(weight_tying=True)))
    c = describe_config(tmp_path)
    body = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48 + 2 * 32) + 32
    assert (c.embedding, c.output_head, c.non_embedding, c.total) == (64 * 32, 0, body, 64 * 32 + body)


@pytest.mark.parametrize("backbone", ["llada", "qwen"])
@pytest.mark.parametrize("size", [TINY, ModelSize(hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2),
                                  ModelSize(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=100,
                                            tie_word_embeddings=True)])
def test_closed_form_counts_equal_the_built_model(backbone, size):
    config = build_config(backbone, size, TOKENS, causal=True)
    assert count_size(backbone, size, TOKENS.vocab_size) == count_config(config)
    assert count_config(config) == count_model(build_model(config, seed=0))


# ---------------------------------------------------------------- 3. parameter matching

def test_aspect_rule_shapes():
    s = AspectRule().shape(256)
    assert (s.hidden_size, s.num_layers, s.num_heads, s.intermediate_size) == (256, 4, 4, 704)
    s = AspectRule().shape(768)
    assert (s.num_layers, s.num_heads, s.intermediate_size) == (12, 12, 2048)
    s = AspectRule(width_step=16, aspect=16, head_dim=16).shape(48, ModelSize(dropout=0.1))
    assert (s.num_layers, s.num_heads, s.intermediate_size, s.dropout) == (3, 3, 128, 0.1)
    with pytest.raises(UserError, match="head_dim"):
        AspectRule(width_step=48, head_dim=64)


def test_solve_size_picks_the_nearest_width():
    rule = AspectRule()
    at = {d: count_size("llada", rule.shape(d), 1000).non_embedding for d in (448, 512, 576)}
    assert solve_size("llada", at[512], vocab_size=1000).hidden_size == 512
    assert solve_size("llada", at[512] - 1000, vocab_size=1000).hidden_size == 512
    assert solve_size("llada", (at[448] + at[512]) // 2 - 1000, vocab_size=1000).hidden_size == 448
    total = count_size("qwen", rule.shape(576), 1000).total
    assert solve_size("qwen", total, vocab_size=1000, kind="total").hidden_size == 576
    for bad in (dict(target=0), dict(target=10**6, kind="body"), dict(target=10**15)):
        with pytest.raises(UserError):
            solve_size("llada", **{"vocab_size": 1000, **bad})


def test_check_match_rejects_arms_beyond_tolerance_naming_both_counts():
    assert check_match({"a": 1000, "b": 1015}) == pytest.approx(0.015)
    with pytest.raises(UserError, match=r"b has 1,030.*a has 1,000"):
        check_match({"a": 1000, "b": 1030})
    assert check_match({"a": 1000, "b": 1030}, tolerance=0.05) == pytest.approx(0.03)


def test_match_arms_gives_the_2x2_one_shape_within_tolerance():
    arms = ["llada-mdm", "llada-ar", "qwen-mdm", "qwen-ar", "qwen-ar-reg"]
    m = match_arms(arms, 3_000_000, vocab_size=1000)
    shapes = {(a.size.hidden_size, a.size.num_layers, a.size.num_heads, a.size.intermediate_size) for a in m.values()}
    assert shapes == {(256, 4, 4, 704)}
    assert m["llada-ar"].deviation == 0 and 0 < m["qwen-ar"].deviation < 0.02
    assert m["qwen-ar-reg"].size.dropout == 0.1 and m["qwen-ar"].size.dropout == 0.0
    with pytest.raises(UserError, match="tolerance"):
        match_arms(arms, 3_000_000, vocab_size=1000, tolerance=1e-4)
    exact = match_arms(arms, 3_000_000, vocab_size=1000, tolerance=1e-4, adjust_mlp=True)
    assert exact["qwen-ar"].size.intermediate_size == 703 and exact["qwen-ar"].deviation == 0


def test_match_arms_rejects_an_arm_whose_overrides_break_the_match():
    wide = Arm("wide", "qwen", "ar", "ar", overrides={"hidden_size": 320})
    with pytest.raises(UserError, match="wide has"):
        match_arms(["llada-mdm", wide], 3_000_000, vocab_size=1000)


# ---------------------------------------------------------------- 4. local checkpoints

def test_llada_original_sharded_folder_gives_the_original_logits(tmp_path):
    cfg = tiny_llada()
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"}}))
    tensors = llada_tensors(cfg)
    write_shards(tmp_path, tensors)
    assert detect_layout(tmp_path) == "llada"
    model, tokenizer, arm = load_pretrained(tmp_path)
    assert arm.name == "llada-mdm" and tokenizer is None and not model.training
    assert model.config.is_causal is False and model.config.mask_token_id == 59
    got = logits_of(model, IDS)
    assert got.shape == (len(IDS), 64)
    torch.testing.assert_close(got, llada_reference(tensors, cfg, IDS), atol=1e-4, rtol=1e-4)


def test_llada_tied_single_file_and_bf16(tmp_path):
    cfg = tiny_llada(weight_tying=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = llada_tensors(cfg, seed=1)
    save_file(tensors, tmp_path / "model.safetensors")
    model, _, _ = load_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(logits_of(model, IDS), llada_reference(tensors, cfg, IDS), atol=1e-4, rtol=1e-4)
    half, _, _ = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_llada_weights_from_torch_bin_read_weights_only(tmp_path):
    cfg = tiny_llada()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = llada_tensors(cfg, seed=2)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    model, _, _ = load_pretrained(tmp_path)
    torch.testing.assert_close(logits_of(model, IDS), llada_reference(tensors, cfg, IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"), "blocks.1.up_proj.weight' is missing"),
    (lambda t: t.update({"model.transformer.blocks.0.extra.weight": torch.zeros(2)}), "blocks.0.extra"),
    (lambda t: t.update({"model.transformer.ln_f.weight": torch.ones(31)}), "ln_f.weight' has shape"),
])
def test_broken_llada_folders_are_user_errors_naming_the_tensor(tmp_path, damage, message):
    cfg = tiny_llada()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = llada_tensors(cfg)
    damage(tensors)
    write_shards(tmp_path, tensors)
    with pytest.raises(UserError, match=message):
        load_pretrained(tmp_path)


def test_missing_shard_and_non_model_folders_are_user_errors(tmp_path):
    cfg = tiny_llada()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_shards(tmp_path, llada_tensors(cfg))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        load_pretrained(tmp_path / "..")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="gpt2"):
        load_pretrained(tmp_path)


def test_llada_names_map_both_ways_and_gate_is_ff_proj():
    assert hf_name("model.transformer.blocks.3.ff_proj.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert hf_name("model.transformer.blocks.0.ff_out.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("model.transformer.ff_out.weight") == "lm_head.weight"
    model = build_model(llada_config_from_json(tiny_llada()), seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert [hf_name(llada_name(n)) for n in names] == names
    assert set(map(llada_name, names)) == set(llada_tensors(tiny_llada()))
    with pytest.raises(UserError, match="wpe"):
        llada_state_dict_to_hf({"model.transformer.wpe.weight": torch.zeros(1)})


def test_qwen2_hf_sharded_folder_gives_the_original_logits(tmp_path):
    cfg = tiny_qwen2()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = qwen2_tensors(cfg)
    write_shards(tmp_path, tensors, shards=3)
    assert detect_layout(tmp_path) == "hf"
    model, tokenizer, arm = load_pretrained(tmp_path)
    assert arm.name == "qwen-ar" and tokenizer is None
    ids = [i for i in IDS if i < 64]
    torch.testing.assert_close(logits_of(model, ids), qwen2_reference(tensors, cfg, ids), atol=1e-4, rtol=1e-4)


def test_qwen2_folder_with_a_missing_tensor_is_a_user_error(tmp_path):
    cfg = tiny_qwen2()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = qwen2_tensors(cfg)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    write_shards(tmp_path, tensors)
    with pytest.raises(UserError, match="k_proj.bias"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("backbone,causal,arm", [("llada", False, "llada-mdm"), ("qwen", False, "qwen-mdm"),
                                                 ("llada", True, "llada-ar")])
def test_plain_hf_folders_get_their_arm_from_backbone_and_attention(tmp_path, backbone, causal, arm):
    model = build_model(build_config(backbone, TINY, TOKENS, causal=causal), seed=0).eval()
    model.save_pretrained(tmp_path)
    loaded, _, got = load_pretrained(tmp_path)
    assert got.name == arm
    torch.testing.assert_close(logits_of(loaded, IDS[:4]), logits_of(model, IDS[:4]))


def test_dlmstudy_folder_keeps_its_arm(tmp_path):
    arm = get_arm("qwen-ar-reg")
    model = build_model(build_config("qwen", TINY, TOKENS, causal=arm.causal), seed=0)
    save_checkpoint(tmp_path, model, None, arm)
    assert detect_layout(tmp_path) == "dlmstudy"
    _, tokenizer, got = load_pretrained(tmp_path)
    assert got == arm and tokenizer is None


@needs_shared
def test_folder_tokenizer_is_loaded(tmp_path):
    cfg = tiny_qwen2()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_shards(tmp_path, qwen2_tensors(cfg))
    for f in (SHARED / "tokenizers" / "qwen2").iterdir():
        shutil.copy(f, tmp_path / f.name)
    _, tokenizer, _ = load_pretrained(tmp_path)
    assert tokenizer.decode(tokenizer("masked diffusion")["input_ids"]) == "masked diffusion"


# ---------------------------------------------------------------- 5-6. arms

def test_registry_has_the_2x2_and_the_regularised_control():
    for name, backbone, objective in [("llada-mdm", "llada", "mdm"), ("llada-ar", "llada", "ar"),
                                      ("qwen-mdm", "qwen", "mdm"), ("qwen-ar", "qwen", "ar")]:
        assert (ARMS[name].backbone, ARMS[name].objective, ARMS[name].causal) == (backbone, objective, objective == "ar")
    reg = get_arm("qwen-ar-reg")
    assert (reg.backbone, reg.objective, reg.sampler, reg.causal) == ("qwen", "ar", "ar", True)
    model, training = split_overrides(reg)
    assert model == {"dropout": 0.1} and training == {"weight_decay": 0.1}
    size = replace(TINY, **model)
    assert build_config(reg.backbone, size, TOKENS, causal=reg.causal).attention_dropout == 0.1
    with pytest.raises(UserError, match="qwen-ar-reg"):
        get_arm("qwen-ar-regularised")


# ---------------------------------------------------------------- 7. SDPA, gradient checkpointing, bf16, direction

@pytest.mark.filterwarnings("ignore:`(gradient|is_gradient)_checkpointing:FutureWarning")
@pytest.mark.parametrize("backbone", ["llada", "qwen"])
def test_gradient_checkpointing_gives_the_same_gradients(backbone):
    config = build_config(backbone, TINY, TOKENS, causal=False)
    ids = torch.tensor([IDS[:6], IDS[1:7]])
    grads = []
    for checkpointing in (False, True):
        model = build_model(config, seed=0).train()
        assert model.config._attn_implementation == "sdpa"
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        F.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(g.abs().sum() > 0 for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


@pytest.mark.parametrize("backbone", ["llada", "qwen"])
def test_bf16_forward(backbone):
    model = build_model(build_config(backbone, TINY, TOKENS, causal=False), seed=0).eval()
    full = logits_of(model, IDS)
    with torch.no_grad():
        half = model.to(torch.bfloat16)(torch.tensor([IDS])).logits[0]
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), full, atol=0.1, rtol=0.05)


def first_position_shift(model) -> float:
    """How much position 0's logits move when only the last token changes."""
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[5, 6, 7, 8, 10]])
    with torch.no_grad():
        return (model(a).logits[0, 0] - model(b).logits[0, 0]).abs().max().item()


@pytest.mark.parametrize("backbone", ["llada", "qwen"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_direction_is_real_and_survives_reload(tmp_path, backbone, attn):
    for causal in (False, True):
        config = build_config(backbone, TINY, TOKENS, causal=causal)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
        assert (first_position_shift(model) > 1e-4) is not causal
        model.save_pretrained(tmp_path / str(causal))
        again = AutoModelForCausalLM.from_pretrained(tmp_path / str(causal), attn_implementation=attn).eval()
        assert again.config.is_causal is causal
        assert (first_position_shift(again) > 1e-4) is not causal


def test_loaded_llada_checkpoint_is_bidirectional(tmp_path):
    cfg = tiny_llada()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_shards(tmp_path, llada_tensors(cfg))
    model, _, _ = load_pretrained(tmp_path)
    assert first_position_shift(model) > 1e-4
