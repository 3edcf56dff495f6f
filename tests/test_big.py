"""The tutorial at its real size, checked at tiny shapes: random-weight model folders (`dlmstudy init-model`), LoRA
SFT with a bf16 frozen base, gradient checkpointing and resume, `bench --measure sft` and its FLOPs, merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlmstudy.cli import main
from dlmstudy.data.tokenizer import byte_tokenizer
from dlmstudy.errors import UserError
from dlmstudy.models.checkpoints import load_pretrained, save_checkpoint
from dlmstudy.models.params import describe_config
from dlmstudy.models.random_init import (
    folder_tensors,
    model_config_path,
    parse_size,
    plan_shards,
    random_model,
)
from dlmstudy.runners.init_model import init_model

# Tiny configs in the two real layouts; 320 ids leave room for a byte-level tokenizer (256 bytes + specials).
TINY_LLADA = {
    "model_type": "llada", "architectures": ["LLaDAModelLM"], "activation_type": "silu", "block_type": "llama",
    "layer_norm_type": "rms", "rope": True, "alibi": False, "include_bias": False, "include_qkv_bias": False,
    "residual_dropout": 0.0, "embedding_dropout": 0.0, "attention_dropout": 0.0, "d_model": 32, "n_layers": 2,
    "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 48, "vocab_size": 320, "embedding_size": 320,
    "max_sequence_length": 256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "weight_tying": False, "init_std": 0.02,
    "eos_token_id": 300, "pad_token_id": 300, "mask_token_id": 310,
}
TINY_QWEN = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "max_window_layers": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "sliding_window": 256, "use_sliding_window": False, "tie_word_embeddings": False, "initializer_range": 0.02,
    "bos_token_id": 300, "eos_token_id": 300, "vocab_size": 320, "torch_dtype": "bfloat16", "use_cache": True,
}
IDS = [[5, 17, 42, 300, 8, 23, 99, 7]]


def quiet(message: str) -> None:
    pass


def write_config(folder: Path, raw: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(raw))
    return path


def shard_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float()


# ---------------------------------------------------------------- 1. random-weight folders


def test_llada_folder_is_sharded_in_the_original_layout_and_loads_as_written(tmp_path):
    config = write_config(tmp_path / "cfg", TINY_LLADA)
    folder = init_model(config, tmp_path / "llada", shard_size="20KB", device="cpu", progress=quiet)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(set(index["weight_map"].values()))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((folder / s).stat().st_size <= 20_000 + 4096 for s in shards)  # a shard's tensors within the size
    stored = shard_tensors(folder)
    assert set(stored) == set(index["weight_map"]) and "model.transformer.blocks.1.ff_proj.weight" in stored
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in stored.values())
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads((folder / "config.json").read_text()) == TINY_LLADA  # the config as given

    model, tokenizer, arm = load_pretrained(folder)
    assert arm.name == "llada-mdm" and model.dtype == torch.bfloat16
    assert tokenizer.mask_token_id == 310 and tokenizer.eos_token_id == 300 and tokenizer.chat_template
    drawn, _ = random_model(config, device="cpu")
    for name, tensor in drawn.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    matrices = [t for t in stored.values() if t.dim() == 2]
    assert all(abs(float(t.float().std()) - 0.02) < 0.005 for t in matrices)
    assert all(torch.equal(t, torch.ones_like(t)) for n, t in stored.items() if n.endswith("norm.weight"))


def test_qwen_folder_loads_in_plain_transformers_and_round_trips(tmp_path):
    config = write_config(tmp_path / "cfg", TINY_QWEN)
    folder = init_model(config, tmp_path / "qwen", device="cpu", progress=quiet)
    assert (folder / "model.safetensors").exists() and not (folder / "model.safetensors.index.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert plain.dtype == torch.bfloat16 and tokenizer.eos_token_id == 300
    assert torch.count_nonzero(plain.model.layers[0].self_attn.q_proj.bias) == 0
    ours, _, arm = load_pretrained(folder)
    assert arm.name == "qwen-ar"
    torch.testing.assert_close(logits(ours), logits(plain), rtol=0, atol=0)
    save_checkpoint(tmp_path / "again", ours, tokenizer, arm)
    again, _, _ = load_pretrained(tmp_path / "again")
    torch.testing.assert_close(logits(again), logits(plain), rtol=0, atol=0)
    text = "Héllo, 世界! <|im_end|>"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_shipped_8b_configs_have_the_real_shapes_and_plan_their_shards():
    llada, qwen = model_config_path("llada-8b"), model_config_path("qwen2.5-7b")
    raw = json.loads(llada.read_text())
    assert (raw["d_model"], raw["n_layers"], raw["n_heads"], raw["mlp_hidden_size"], raw["vocab_size"],
            raw["mask_token_id"]) == (4096, 32, 32, 12288, 126464, 126336)
    assert describe_config(llada).total == 8_015_581_184
    counts = describe_config(qwen)
    assert (counts.total, counts.non_embedding) == (7_615_616_512, 6_525_621_760)
    tensors = folder_tensors(raw)
    assert len(tensors) == 32 * 9 + 3 and tensors[0] == ("model.transformer.wte.weight", (126464, 4096))
    shards = plan_shards(tensors, 2, parse_size("5GB"))
    sizes = [sum(torch.Size(s).numel() * 2 for _, s in shard) for shard in shards]
    assert len(shards) == 4 and max(sizes) <= 5e9 and sum(sizes) == 2 * 8_015_581_184


def test_byte_tokenizer_puts_special_tokens_at_the_configs_ids():
    tok = byte_tokenizer(126464, eos_token_id=126081, pad_token_id=126081, mask_token_id=126336)
    assert len(tok) == 126464 and (tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (126081, 126081, 126336)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [126462, 126463]
    ids = tok("déjà vu", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("déjà vu".encode()) and max(ids) < 256
    with pytest.raises(UserError, match="distinct special ids"):
        byte_tokenizer(320, eos_token_id=300, mask_token_id=300)
    with pytest.raises(UserError, match="distinct special ids"):
        byte_tokenizer(320, eos_token_id=100)


def test_init_model_command_and_its_one_line_errors(tmp_path, capsys):
    config = write_config(tmp_path / "cfg", TINY_QWEN)
    assert main(["init-model", "--config", str(config), "--out", str(tmp_path / "m"), "--device", "cpu",
                 "--dtype", "fp32"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").dtype == torch.float32
    assert "random weights" in capsys.readouterr().out
    for args, message in (
        (["--config", str(config), "--out", str(tmp_path / "m")], "exists and is not empty"),
        (["--config", "llada-80b", "--out", str(tmp_path / "x")], "llada-8b, qwen2.5-7b"),
        (["--config", str(config), "--out", str(tmp_path / "x"), "--shard_size", "5 parsecs"], "shard size"),
        (["--config", str(config), "--out", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "m2")],
         "not a loadable tokenizer"),
    ):
        assert main(["init-model", *args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_a_tokenizer_with_more_ids_than_rows_is_refused(tmp_path):
    big = init_model(write_config(tmp_path / "cfg", TINY_QWEN), tmp_path / "big", device="cpu", progress=quiet)
    small = write_config(tmp_path / "small", {**TINY_QWEN, "vocab_size": 300, "bos_token_id": 290, "eos_token_id": 290})
    with pytest.raises(UserError, match="321 ids do not fit the model's 300 embedding rows"):
        init_model(small, tmp_path / "out", tokenizer=big, device="cpu", progress=quiet)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 2. LoRA SFT: bf16 frozen base, checkpointing, resume

ROWS = [{"instruction": f"Name colour number {i}.", "input": "", "output": f"Colour {i} is {c}."}
        for i, c in enumerate(["red", "blue", "green", "teal", "gold", "grey", "pink", "plum", "jade", "ruby"])]


def lora_base(tmp_path: Path, **config) -> torch.nn.Module:
    model, _ = random_model(write_config(tmp_path / "cfg", {**TINY_LLADA, **config}), dtype=torch.bfloat16)
    return model


def sft_features(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (12 + i % 3,), generator=g).tolist(), "prompt_len": 4, "index": i}
            for i in range(n)]


def lora_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    from dlmstudy.training.registry import build_objective

    objective = build_objective("mdm", seed=0, fast_head=True, mask_id=310)
    torch.manual_seed(0)  # the adapters' dropout
    loss, _ = objective(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def checkpointed(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(tmp_path):
    from dlmstudy.data.sft import SFTCollator
    from dlmstudy.training.lora import apply_lora, enable_gradient_checkpointing

    model = apply_lora(lora_base(tmp_path), r=4, lora_alpha=8, lora_dropout=0.2).train()
    with torch.no_grad():  # B starts at zero, which leaves A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    batch = SFTCollator(300)(sft_features(2))
    plain = lora_grads(model, batch)
    enable_gradient_checkpointing(model)
    assert checkpointed(model)
    again = lora_grads(model, batch)
    assert again[0] == plain[0]
    assert set(again[1]) == set(plain[1]) and all(g.abs().sum() > 0 for g in plain[1].values())
    for name, grad in plain[1].items():
        torch.testing.assert_close(again[1][name], grad, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_trainers_gradient_checkpointing_trains_the_same_adapters(tmp_path):
    """`sft.gradient_checkpointing: true` reaches TrainingArguments; with the SFT runner's non-reentrant setting the
    Trainer trains the LoRA adapters exactly as without (dropout masks replayed in the recomputation)."""
    from transformers import TrainingArguments

    from dlmstudy.data.sft import SFTCollator
    from dlmstudy.training.lora import apply_lora
    from dlmstudy.training.registry import build_objective
    from dlmstudy.training.trainer import DLMTrainer

    trained = []
    for on in (False, True):
        model = apply_lora(lora_base(tmp_path / str(on)), r=4, lora_alpha=8, lora_dropout=0.2, seed=0)
        args = TrainingArguments(output_dir=str(tmp_path / f"out{on}"), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, report_to="none",
                                 use_cpu=True, save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
                                 remove_unused_columns=False, gradient_checkpointing=on,
                                 gradient_checkpointing_kwargs={"use_reentrant": False} if on else None)
        trainer = DLMTrainer(model=model, args=args, train_dataset=sft_features(8), data_collator=SFTCollator(300),
                             objective=build_objective("mdm", seed=0, fast_head=True, mask_id=310),
                             tokens_per_step=64)
        trainer.train()
        assert checkpointed(model) == on
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        trained.append((losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert trained[1][0] == trained[0][0] and len(trained[0][0]) == 2
    for name, weight in trained[0][1].items():
        torch.testing.assert_close(trained[1][1][name], weight, rtol=0, atol=0)


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny bf16 LLaDA folder from init-model and ten Alpaca rows."""
    root = tmp_path_factory.mktemp("sft")
    base = init_model(write_config(root / "cfg", TINY_LLADA), root / "base", device="cpu", progress=quiet)
    rows = root / "alpaca.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return base, rows


def sft_spec(root: Path, base: Path, rows: Path):
    from dlmstudy.study.spec import parse_spec

    return parse_spec({
        "name": "big", "seed": 0, "device": "cpu", "runs_dir": str(root / "runs"), "reports_dir": str(root / "rep"),
        "tracking": {"report_to": "none"}, "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "data": {"pretrain": {"source": "builtin:biographies", "people": 20}, "validation_tokens": 128,
                 "max_length": 16},
        "arms": ["llada"], "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
        "grid": {"unique_people": [10], "total_tokens": 256},
        "sft": {"source": f"{rows}[train:8,test:2]", "base": {"llada": str(base)}, "epochs": [2], "max_length": 96,
                "validation_rows": 2, "lora": True, "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                "learning_rate": 1e-2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                "gradient_checkpointing": True},
        "evaluation": {"mc_num": 1, "qa_people": 2, "steps": 2, "gen_length": 2, "block_length": 2, "batch_size": 2},
    })


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(run_dir / "adapter" / "adapter_model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_sft_run_keeps_the_base_bf16_checkpoints_adapters_and_resumes(tmp_path, sft_inputs, monkeypatch):
    from dlmstudy.runners import queue, sft
    from dlmstudy.runners.run import Interrupted, StopOnSignal

    base, rows = sft_inputs
    real_fit, seen = sft.fit, {}

    def watched_fit(model, **kwargs):
        seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
        seen["trainable"] = {p.dtype for p in model.parameters() if p.requires_grad}
        out = real_fit(model, **kwargs)
        seen["checkpointed"] = checkpointed(model)
        return out

    monkeypatch.setattr(sft, "fit", watched_fit)
    whole = queue.run_queue(sft_spec(tmp_path / "whole", base, rows), only=["stage=sft"], progress=quiet)
    assert seen == {"frozen": {torch.bfloat16}, "trainable": {torch.float32}, "checkpointed": True}
    run_dir = tmp_path / "whole" / "runs" / "big" / whole[0]["run_id"]
    assert whole[0]["steps"] == 4 and whole[0]["tokens_per_step"] == 2 * 2 * 96

    real_step_end = StopOnSignal.on_step_end

    def stop_after_step_2(self, args, state, control, **kwargs):
        self.requested = self.requested or state.global_step == 2
        return real_step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnSignal, "on_step_end", stop_after_step_2)
    spec = sft_spec(tmp_path / "killed", base, rows)
    with pytest.raises(Interrupted):
        queue.run_queue(spec, only=["stage=sft"], progress=quiet)
    killed_dir = tmp_path / "killed" / "runs" / "big" / whole[0]["run_id"]
    saved = killed_dir / "checkpoints" / "checkpoint-2"
    assert (saved / "adapter_model.safetensors").exists() and not list(saved.glob("model*.safetensors"))
    monkeypatch.setattr(StopOnSignal, "on_step_end", real_step_end)
    said = []
    resumed = queue.run_queue(spec, only=["stage=sft"], progress=said.append)
    assert any("resuming from checkpoint-2" in line for line in said) and resumed[0]["steps"] == 4
    for name, weight in adapter_weights(run_dir).items():
        torch.testing.assert_close(adapter_weights(killed_dir)[name], weight, rtol=0, atol=0)
    merged = AutoModelForCausalLM.from_pretrained(killed_dir / "checkpoint")
    assert merged.dtype == torch.bfloat16 and not merged.config.is_causal


# ---------------------------------------------------------------- 3. bench --measure sft


def test_lora_flops_count_the_work_really_done():
    from dlmstudy.runners.bench import lora_flops

    frozen = 32 * (4 * 4096 * 4096 + 3 * 4096 * 12288)  # LLaDA-8B's block matrices
    lora = 32 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 12288))  # r 32 on all seven of them
    shape = dict(tokens=2048, n_frozen=frozen, n_lora=lora, n_layers=32, d_attention=4096, seq_len=1024,
                 d_model=4096, vocab=126464, head_rows=700)
    bidirectional = lora_flops(causal=False, **shape)
    assert bidirectional == 2048 * (4 * frozen + 6 * lora + 12 * 32 * 4096 * 1024) + 4 * 4096 * 126464 * 700
    assert bidirectional == 62_954_322_001_920  # 30.7 GFLOP a token, against 6 N = 48.1 GFLOP
    assert bidirectional - lora_flops(causal=True, **shape) == 2048 * 6 * 32 * 4096 * 1024


def test_bench_sft_measures_each_configs_own_model_with_a_bf16_frozen_base(tmp_path):
    from dlmstudy.runners.bench import lora_flops, run_bench

    configs = [write_config(tmp_path / "llada", TINY_LLADA), write_config(tmp_path / "qwen", TINY_QWEN)]
    seen = []
    records = run_bench(device="cpu", configs=[str(c) for c in configs], measure=["sft"], steps=2, warmup=1,
                        seq_len=32, peak=1e12, checkpointing=[False, True], accumulation=2, progress=quiet,
                        on_record=seen.append)
    assert seen == records and [(r["arm"], r["gradient_checkpointing"]) for r in records] == [
        ("llada-mdm", False), ("llada-mdm", True), ("qwen-ar", False), ("qwen-ar", True)]
    d, ff = 32, 48
    for r in records:
        kv = 16 if r["arm"] == "qwen-ar" else 32  # Qwen: 2 of 4 heads for keys and values
        frozen = 2 * (2 * d * d + 2 * d * kv + 3 * d * ff)
        lora = 2 * 32 * (2 * (d + d) + 2 * (d + kv) + 3 * (d + ff))
        assert (r["batch"], r["seq_len"], r["prompt_len"]) == (2, 32, 8)
        assert r["frozen_dtypes"] == ["bfloat16"] and r["frozen_fp32_params"] == 0
        assert r["trainable_dtypes"] == ["float32"] and r["params_trainable"] == lora
        if r["arm"] == "qwen-ar":
            assert r["head_rows_per_step"] == 2 * (32 - 8)  # every answer token, none of the prompt's
        else:
            assert 0 < r["head_rows_per_step"] < 2 * (32 - 8)  # the masked answer tokens only
        assert r["flops_per_step"] == lora_flops(
            tokens=64, n_frozen=frozen, n_lora=lora, n_layers=2, d_attention=d, seq_len=32,
            causal=r["arm"] == "qwen-ar", head_rows=r["head_rows_per_step"], d_model=d, vocab=320)
        assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["step_time_s"] / 1e12)
        assert (r["hfu"] > r["mfu"]) == r["gradient_checkpointing"]
        assert r["tokens_per_s"] == pytest.approx(64 / r["step_time_s"])
        assert r["epoch_s"] == pytest.approx(1000 * r["step_time_s"]) and r["epoch_rows"] == 2000


# ---------------------------------------------------------------- 4. merging and sampling the merged model


@pytest.mark.parametrize("raw", [TINY_LLADA, TINY_QWEN], ids=["llada", "qwen"])
def test_merge_lora_keeps_the_bf16_base_and_gives_the_adapter_models_logits(tmp_path, raw, monkeypatch):
    from dlmstudy.training import merge
    from dlmstudy.training.lora import apply_lora

    base = init_model(write_config(tmp_path / "cfg", raw), tmp_path / "base", device="cpu", progress=quiet)
    model, _, arm = load_pretrained(base)
    adapted = apply_lora(model, r=4, lora_alpha=8, seed=0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    adapted.save_pretrained(tmp_path / "adapter")
    expected = logits(adapted.eval())
    loaded = []
    real_load = merge.load_pretrained
    monkeypatch.setattr(merge, "load_pretrained", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    merged_dir = merge.merge_lora(tmp_path / "adapter", base, tmp_path / "merged")
    assert {p.dtype for p in loaded[0][0].parameters()} == {torch.bfloat16}  # never an fp32 copy of the base
    assert {t.dtype for t in shard_tensors(merged_dir).values()} == {torch.bfloat16}
    merged, tokenizer, merged_arm = load_pretrained(merged_dir)
    assert merged_arm.name == arm.name and tokenizer.eos_token_id == 300
    torch.testing.assert_close(logits(merged), expected, rtol=0.02, atol=0.02)
    assert not torch.allclose(logits(merged), logits(load_pretrained(base)[0]), atol=0.02)
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)
    torch.testing.assert_close(logits(plain), logits(merged), rtol=0, atol=0)


def test_generate_and_chat_report_tokens_per_second(tmp_path, capsys):
    from dlmstudy.sampling.chat import Chatbot, DecodeOptions, run_chat

    base = init_model(write_config(tmp_path / "cfg", TINY_LLADA), tmp_path / "base", device="cpu", progress=quiet)
    assert main(["generate", "--model_name_or_path", str(base), "--prompt", "Hi", "--max_length", "8",
                 "--steps", "4", "--block_length", "8", "--threshold", "0.9", "--use_cache", "--show_speed",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("(8 tokens in ") and err[-1].endswith(" tokens/s)")
    bot = Chatbot.load(base, options=DecodeOptions(max_length=8, threshold=0.9, use_cache=True), device="cpu")
    lines: list[str] = []
    replies = run_chat(bot, ["Hi", "Again"], lines.append, show_speed=True)
    assert [line for line in lines if not line.startswith("assistant> ")] == [r.speed_line() for r in replies]
    assert all(r.seconds > 0 and f"{len(r.tokens) / r.seconds:,.1f} tokens/s" in r.speed_line() for r in replies)
