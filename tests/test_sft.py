"""The SFT stage end to end on a tiny built-in study: variants (padding x normalisation), their run ids, what an SFT
run records (settings, diagnostics, decode grid, answers), padding tokens travelling with the checkpoint, and the
report's side-by-side answers."""

import json

import pandas as pd
import pytest
import torch

from dlmstudy.analysis.frames import load_study
from dlmstudy.models.checkpoints import load_pretrained
from dlmstudy.reports.render import build_report
from dlmstudy.runners import queue
from dlmstudy.runners.sft import resolve_sft_runs
from dlmstudy.sampling.chat import Chatbot, DecodeOptions
from dlmstudy.sampling.end_tokens import end_tokens
from dlmstudy.errors import UserError
from dlmstudy.study.spec import parse_spec

TINY = {
    "name": "tiny-sft", "seed": 0, "device": "cpu", "tracking": {"report_to": "none"},
    "tokenizer": {"kind": "bpe", "vocab_size": 320},
    "data": {"pretrain": {"source": "builtin:biographies", "people": 60}, "validation_tokens": 256, "max_length": 32},
    "arms": ["llada", "qwen"],
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
    "grid": {"unique_people": [60], "total_tokens": 1024},
    "training": {"per_device_train_batch_size": 16, "learning_rate": 3e-3, "eval_batches": 1},
    "sft": {"epochs": [1], "max_length": 64, "validation_rows": 8, "lora": True, "r": 4, "lora_alpha": 8,
            "learning_rate": 1e-3, "per_device_train_batch_size": 16, "max_steps": 3,
            "decode_grid": {"gen_length": [4, 8], "block_length": [1, "whole"],
                            "end_tokens": ["none", "confidence_eos_eot_inf"]},
            "variants": [{"padding": ["eos", "rainbow", "masked_pad"], "pad_tokens": 3}, {"loss_norm": "token"}]},
    "evaluation": {"mc_num": 2, "qa_people": 2, "steps": 4, "gen_length": 4, "block_length": 4, "batch_size": 16},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    spec = parse_spec({**TINY, "runs_dir": str(root / "runs"), "reports_dir": str(root / "reports")})
    results = queue.run_queue(spec, progress=lambda m: None)
    return spec, root, {r["run_id"]: r for r in results if r.get("stage") == "sft"}


def test_variants_multiply_the_diffusion_arm_only():
    spec = parse_spec({**TINY, "sft": {**TINY["sft"], "base": {"llada": "a", "qwen": "b"}}})
    runs = resolve_sft_runs(spec, [])
    labels = [r.run_id.rsplit("_", 1)[0] for r in runs]
    assert labels == ["sft-llada_e1_eos_pad_tokens-3", "sft-qwen_e1", "sft-llada_e1_rainbow_pad_tokens-3",
                      "sft-llada_e1_masked_pad_pad_tokens-3", "sft-llada_e1_token"]  # arms innermost
    assert len({r.run_id for r in runs}) == 5
    by_label = {r.run_id.rsplit("_", 1)[0]: r for r in runs}
    assert by_label["sft-llada_e1_token"].sft.loss_norm == "token" and by_label["sft-llada_e1_token"].sft.padding == "eos"
    assert "padding" not in by_label["sft-qwen_e1"].config["sft"]  # AR runs do not depend on diffusion-only keys
    grids = parse_spec({**TINY, "sft": {**TINY["sft"], "base": {"llada": "a", "qwen": "b"}, "variants": [
        {"decode_grid": {"gen_length": [4], "end_tokens": ["none"]}},
        {"decode_grid": {"gen_length": [4], "end_tokens": ["both"]}}]}})
    assert [r.arm.name for r in resolve_sft_runs(grids, [])] == ["llada", "qwen", "llada"]  # AR ignores end tokens


@pytest.mark.slow
def test_each_run_records_its_settings_diagnostics_and_decode_grid(finished):
    spec, root, results = finished
    assert len(results) == 5
    for rid, r in results.items():
        run = root / "runs" / "tiny-sft" / rid
        assert {"accuracy", "answer_f1", "empty_answers", "content_nll", "first_token_rank"} <= set(r)
        diagnostics = json.loads((run / "eval" / "diagnostics.json").read_text())
        grid = pd.read_csv(run / "eval" / "decode_grid.csv")
        answers = [json.loads(line) for line in (run / "eval" / "qa_samples.jsonl").read_text().splitlines()]
        assert answers and all({"text", "empty", "answer_tokens"} <= set(a) for a in answers)
        if r["arm"] == "llada":
            assert r["padding"] in ("eos", "rainbow", "masked_pad") and r["decoding"]["confidence_eos_eot_inf"]
            assert set(diagnostics["canvas"]) == {"16", "64"}
            profile = diagnostics["canvas"]["64"]
            assert len(profile["p_end"]) == 64 and all(0 <= p <= 1 + 1e-6 for p in profile["p_end"])
            assert all(e >= max(a, b) - 1e-9 for e, a, b in zip(profile["p_end"], profile["p_eos"], profile["p_eot"]))
            assert r["p_end_offset0"] == profile["p_end"][0]
            # gen 4 and 8, block 1 and whole, two end-token options
            assert len(grid) == 8 and set(grid["end_tokens"]) == {"none", "confidence_eos_eot_inf"}
        else:
            assert "padding" not in r and "first_token" in diagnostics
            assert grid[["gen_length", "block_length"]].values.tolist() == [[4, 1], [8, 1]]
        assert grid["answer_f1"].between(0, 1).all() and grid["empty_answers"].between(0, 1).all()


@pytest.mark.slow
def test_rainbow_padding_tokens_travel_with_the_checkpoint_and_end_answers(finished):
    spec, root, results = finished
    rid = next(rid for rid, r in results.items() if r.get("padding") == "rainbow")
    model, tokenizer, arm = load_pretrained(root / "runs" / "tiny-sft" / rid / "checkpoint", device="cpu")
    pads = tokenizer.convert_tokens_to_ids([f"<|pad_{k}|>" for k in range(3)])
    assert len(set(pads)) == 3 and max(pads) < model.get_input_embeddings().weight.shape[0]
    assert set(pads) <= set(end_tokens(tokenizer).eos)
    torch.manual_seed(0)
    bot = Chatbot(model, tokenizer, arm, DecodeOptions(max_length=8))
    reply = bot.reply([{"role": "user", "content": "Where was Ada born?"}])
    assert not set(tokenizer.convert_ids_to_tokens(tokenizer(reply.text)["input_ids"])) & {"<|pad_0|>", "<|pad_1|>"}


@pytest.mark.slow
def test_report_shows_both_arms_answers_side_by_side(finished):
    spec, root, _ = finished
    out = build_report(root / "runs" / "tiny-sft", root / "reports" / "tiny-sft")
    text = out.read_text()
    assert "### Held-out questions, both arms' answers" in text and "After 1 SFT epoch" in text
    assert "### Why answers are empty or not: diagnostics per SFT run" in text
    section = text[text.index("After 1 SFT epoch"):]
    header = next(line for line in section.splitlines() if line.startswith("| question"))
    assert "| expected |" in header and "| llada |" in header and "| qwen |" in header
    answers = pd.read_csv(out.parent / "tables" / "sft_answers.csv")
    assert set(answers["arm"]) == {"llada", "qwen"} and {"question", "expected", "answer"} <= set(answers.columns)
    frames = load_study(root / "runs" / "tiny-sft")
    assert len(frames.sft_runs) == 5 and len(frames.decode_grid) == 4 * 8 + 2


@pytest.mark.parametrize("sft, expected", [
    ({"padding": "zeros"}, "sft.padding: unknown padding 'zeros'; known: eos, pad, rainbow, masked_pad"),
    ({"pad_tokens": 0}, "sft.pad_tokens"),
    ({"variants": [{"padding": ["eos", "rainbo"]}]}, "sft.variants: entry 0: padding: unknown padding 'rainbo'"),
    ({"variants": [{"epochs": [2]}]}, "entry 0: epochs is not a key a variant can set"),
    ({"variants": [{"loss_norm": "batch"}]}, "entry 0: loss_norm"),
    ({"variants": [{}]}, "entry 0 must be a non-empty mapping"),
    ({"decode_grid": {"end_tokens": ["eos_inf"]}}, "sft.decode_grid.end_tokens"),
    ({"decoding": {"block_length": 0}}, "sft.decoding.block_length"),
])
def test_bad_sft_keys_are_one_line_naming_the_key(sft, expected):
    with pytest.raises(UserError) as err:
        parse_spec({**TINY, "sft": {**TINY["sft"], "variants": [], **sft}}, "s.yaml")
    assert expected in str(err.value) and "s.yaml" in str(err.value) and "\n" not in str(err.value)


def test_variant_lists_combine_and_training_arguments_go_to_arguments():
    spec = parse_spec({**TINY, "sft": {"learning_rate": 1e-3, "variants": [
        {"padding": ["eos", "pad"], "loss_norm": ["sequence", "token"]}, {"lora": False, "learning_rate": 1e-4,
                                                                            "seed": [1, 2]}]}})
    expanded = spec.sft.expanded()
    assert [(v.padding, v.loss_norm) for _, v in expanded[:4]] == [("eos", "sequence"), ("eos", "token"),
                                                                   ("pad", "sequence"), ("pad", "token")]
    assert [(keys["seed"], v.lora, v.arguments) for keys, v in expanded[4:]] == [
        (1, False, {"learning_rate": 1e-4}), (2, False, {"learning_rate": 1e-4})]
    assert all(v.arguments == {"learning_rate": 1e-3} for _, v in expanded[:4])
    assert parse_spec({**TINY, "sft": {}}).sft.expanded()[0][0] == {}
