"""`dlmstudy import-dllm`: the tutorial's dllm YAMLs (../shared/seed/configs) become study specs that load and plan,
with one line for every key: where it went, or why it was dropped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from dlmstudy.cli import main
from dlmstudy.errors import UserError
from dlmstudy.study.dllm_import import import_dllm
from dlmstudy.study.spec import load_spec

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "configs"


def one_line_per_key(raw: dict, lines: list[str]) -> None:
    for key in raw:
        said = [line for line in lines if line.startswith((f"{key} ->", f"{key}:"))]
        assert len(said) == 1, (key, said)


@pytest.fixture
def tutorial_dir(tmp_path, monkeypatch):
    """The tutorial's layout: its YAMLs, and the llada-100M model folder they name (config.json and tokenizer files;
    here the shared Qwen2 tokenizer's)."""
    if not SEED.is_dir():
        pytest.skip("needs ../shared/seed beside the repo")
    for name in ("llada-100M-pt.yaml", "llada-8b-sft.yaml"):
        shutil.copy(SEED / name, tmp_path / name)
    shutil.copytree(SEED.parents[1] / "tokenizers" / "qwen2", tmp_path / "llada-100M")
    shutil.copy(SEED / "llada-100M.config.json", tmp_path / "llada-100M" / "config.json")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.shared
def test_the_tutorials_pretraining_yaml_becomes_a_spec_that_plans(tutorial_dir, capsys):
    assert main(["import-dllm", "llada-100M-pt.yaml", "-o", "study.yaml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "spec: study.yaml (dlmstudy plan study.yaml)"
    one_line_per_key(yaml.safe_load((tutorial_dir / "llada-100M-pt.yaml").read_text()), lines)
    spec = load_spec("study.yaml")
    assert spec.name == "llada-pt-c4-500Mtokens-epoch-1" and spec.arms == ["llada"]
    assert (spec.model.hidden_size, spec.model.num_layers, spec.model.num_heads, spec.model.intermediate_size) == (
        448, 6, 7, 768)  # the tutorial's 100M shape, from llada-100M/config.json
    assert spec.tokenizer.path == "llada-100M" and spec.data.pretrain.source.startswith("c4-en-shuffled[")
    assert spec.grid.unique_tokens == [10 * 2 * 8 * 1024] and spec.grid.epochs == [1]  # max_steps x batch x L
    assert spec.training.arguments["learning_rate"] == 3.0e-4 and spec.training.eval_every == 200
    assert "output_dir: dropped, each run writes runs/<study>/<run_id>/" in "\n".join(lines)
    assert main(["plan", "study.yaml"]) == 0
    assert "missing: data.pretrain.source" in capsys.readouterr().out


@pytest.mark.shared
def test_the_tutorials_sft_yaml_becomes_the_sft_stage(tutorial_dir, capsys):
    assert main(["import-dllm", "llada-8b-sft.yaml"]) == 0
    text = capsys.readouterr().out
    comments = [line.removeprefix("#   ") for line in text.splitlines() if line.startswith("#   ")]
    one_line_per_key(yaml.safe_load((tutorial_dir / "llada-8b-sft.yaml").read_text()), comments)
    raw = yaml.safe_load(text)
    assert raw["sft"]["base"] == {"llada": "llada-8b"} and raw["sft"]["lora"] is True and raw["sft"]["r"] == 32
    assert raw["sft"]["warmup_ratio"] == 0.1 and raw["tracking"] == {"report_to": "swanlab"}
    assert "max_steps: dropped, SFT trains whole epochs" in text and "--only stage=sft" in text
    (tutorial_dir / "sft.yaml").write_text(text)
    assert load_spec("sft.yaml").sft.epochs == [1]


def test_epochs_over_a_document_slice_and_what_is_dropped(tmp_path):
    source = tmp_path / "qwen-pt.yaml"
    source.write_text(yaml.safe_dump({
        "model_name_or_path": "models/qwen2.5-100M", "dataset_args": "data/c4[train:200_000,test:1000]",
        "num_train_epochs": 10, "max_length": 1024, "report_to": "wandb", "dataloader_num_workers": 4,
        "seed": 42, "my_own_flag": 1, "weight_decay": 0.1}))
    imported = import_dllm(source, arms=["llada", "qwen"], tokens_per_document=500)
    spec = imported.spec
    assert spec["arms"] == ["llada", "qwen"] and spec["seed"] == 42
    assert spec["grid"] == {"unique_tokens": [100_000_000], "epochs": [10]}
    assert spec["training"] == {"weight_decay": 0.1}
    text = "\n".join(imported.lines)
    assert "report_to: dropped, dlmstudy tracks with SwanLab only (and scalars.jsonl), not wandb" in text
    assert "dataloader_num_workers: dropped" in text and "my_own_flag: dropped, not a dllm" in text
    one_line_per_key(yaml.safe_load(source.read_text()), imported.lines)


def test_a_model_folder_without_a_tokenizer_keeps_the_specs_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "config.json").write_text(
        '{"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, '
        '"num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 320, "max_position_embeddings": 256}')
    (tmp_path / "pt.yaml").write_text("model_name_or_path: small\nmax_steps: 4\nmax_length: 64\n")
    imported = import_dllm(tmp_path / "pt.yaml")
    assert "tokenizer" not in imported.spec and imported.spec["arms"] == ["qwen"]
    assert imported.spec["model"]["hidden_size"] == 64 and imported.spec["model"]["num_kv_heads"] == 2
    assert imported.lines[0].startswith("model_name_or_path: arm qwen (its config.json is Qwen2's); small holds "
                                        "no tokenizer files")


def test_a_yaml_that_cannot_become_a_study_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model_name_or_path: [unclosed\n")
    assert main(["import-dllm", str(tmp_path / "bad.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"dlmstudy: error: {tmp_path / 'bad.yaml'}: is not valid YAML"
    (tmp_path / "steps.yaml").write_text("model_name_or_path: llada-1B\nlearning_rate: 1.0e-4\n")
    with pytest.raises(UserError, match="cannot size the grid: give max_steps"):
        import_dllm(tmp_path / "steps.yaml")
    (tmp_path / "gpt.yaml").write_text("model_name_or_path: gpt2\nmax_steps: 5\n")
    with pytest.raises(UserError, match="the name says neither llada nor qwen; pass --arms"):
        import_dllm(tmp_path / "gpt.yaml")
