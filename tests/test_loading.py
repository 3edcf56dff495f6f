"""Loading input folders: nothing is executed from them, transformers' "run this code? [y/N]" prompt is never
reached, a damaged checkpoint is one line, and an adapter made for another model is refused before merging."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlmstudy.data.tokenizer import special_tokens, train_bpe
from dlmstudy.errors import UserError
from dlmstudy.models.backbones import ModelSize, build_config, build_model
from dlmstudy.models.checkpoints import save_checkpoint
from dlmstudy.models.registry import get_arm
from dlmstudy.study.spec import load_spec
from dlmstudy.training.lora import apply_lora
from dlmstudy.training.merge import merge_lora

SMALL = ModelSize(hidden_size=32, num_layers=2, num_heads=4)
GRID = {"unique_tokens": [1000], "epochs": [1]}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["the cat sat on the mat", "a dog ran in the park"] * 40, vocab_size=300)


def tiny(tokenizer, size: ModelSize = SMALL, arm: str = "qwen-ar"):
    a = get_arm(arm)
    return build_model(build_config(a.backbone, size, special_tokens(tokenizer), causal=a.causal), seed=0)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tokenizer) -> Path:
    """A finished run folder with a tiny qwen-ar checkpoint."""
    run = tmp_path_factory.mktemp("run") / "qwen_u1k_r1_0123456789"
    save_checkpoint(run / "checkpoint", tiny(tokenizer), tokenizer, get_arm("qwen-ar"))
    (run / "run.json").write_text("{}")
    (run / "result.json").write_text("{}")
    return run


def cli(*args: str) -> subprocess.CompletedProcess:
    """The dlmstudy command with "y" waiting on stdin: a prompt that asked would read it and go on."""
    return subprocess.run([sys.executable, "-m", "dlmstudy.cli", *map(str, args)], input="y\n", capture_output=True,
                          text=True, timeout=600)


def one_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlmstudy: error: ") and expected in lines[0], proc.stderr[-2000:]


def code_folder(source: Path, target: Path, marker: Path, *, part: str) -> Path:
    """A copy of a checkpoint whose config (part="model") or tokenizer (part="tokenizer") names code in the folder;
    importing that code would create `marker`."""
    shutil.copytree(source, target)
    (target / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    name = "config.json" if part == "model" else "tokenizer_config.json"
    raw = json.loads((target / name).read_text())
    if part == "model":
        raw.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                "AutoModelForCausalLM": "evil.EvilModel"})
    else:
        raw.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (target / name).write_text(json.dumps(raw))
    return target


@pytest.mark.parametrize("part, expected", [("model", "model_type 'evil' is not supported (its auto_map names "
                                                      "model code in the folder"),
                                            ("tokenizer", "its tokenizer is code in the folder (evil.EvilTokenizer)")])
def test_a_folder_asking_to_run_its_code_is_refused_without_a_prompt(tmp_path, run_folder, part, expected):
    marker = tmp_path / "MARKER"
    folder = code_folder(run_folder / "checkpoint", tmp_path / "asks", marker, part=part)
    one_line(cli("generate", "--model_name_or_path", folder, "--prompt", "hi", "--max_length", "4"), expected)
    one_line(cli("eval", "--checkpoint", folder, "--tasks", "bio_qa_forward", "--limit", "1"), expected)
    if part == "tokenizer":  # a study's tokenizer folder
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump({"name": "x", "grid": GRID, "tokenizer": {"kind": "pretrained",
                                                                                  "path": str(folder)}}))
        one_line(cli("plan", spec), expected)
    assert not marker.exists(), "code from the folder ran"


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_generate_and_eval_on_a_damaged_checkpoint_say_so_in_one_line(tmp_path, run_folder):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    cut_short(run / "checkpoint" / "model.safetensors")
    expected = f"{run / 'checkpoint'}: damaged checkpoint: model.safetensors: cut short"
    one_line(cli("generate", "--model_name_or_path", run / "checkpoint", "--prompt", "hi"), expected)
    one_line(cli("eval", "--checkpoint", run, "--tasks", "bio_qa_forward"), expected)
    (run / "checkpoint" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="model.safetensors: empty"):
        from dlmstudy.models.checkpoints import load_pretrained

        load_pretrained(run / "checkpoint")


def hook_tasks(root: Path, marker: Path) -> Path:
    """A task folder whose YAML includes one from beside it that imports a function from its folder (lm_eval
    imports it without asking)."""
    common, folder = root / "common", root / "tasks"
    common.mkdir()
    folder.mkdir()
    (common / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n\ndef docs(d):\n    return d\n")
    (common / "_base.yaml").write_text("output_type: generate_until\nprocess_docs: !function utils.docs\n")
    (folder / "mine.yaml").write_text("task: mine\ninclude: ../common/_base.yaml\ndataset_path: json\n"
                                      "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n")
    return folder


def test_task_code_runs_only_with_allow_code(tmp_path, run_folder):
    marker = tmp_path / "MARKER"
    tasks = hook_tasks(tmp_path, marker)
    one_line(cli("eval", "--checkpoint", run_folder, "--tasks", "mine", "--include_path", tasks),
             "_base.yaml line 2: a !function hook, code lm_eval would import from the task folder; pass --allow_code")
    assert not marker.exists()
    spec = {"name": "x", "grid": GRID, "evaluation": {"lm_eval": {"tasks": ["mine"], "include_path": str(tasks)}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match="evaluation.lm_eval.include_path: .*_base.yaml line 2 names a !function hook"):
        load_spec(path)
    spec["evaluation"]["lm_eval"]["allow_code"] = True
    path.write_text(yaml.safe_dump(spec))
    assert load_spec(path).evaluation.lm_eval.allow_code


def adapter(tokenizer, folder: Path, size: ModelSize = SMALL) -> Path:
    """LoRA adapters on every linear layer of a fresh model of `size`, saved as peft saves them."""
    apply_lora(tiny(tokenizer, size), r=4, lora_alpha=8).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("size, expected", [
    (ModelSize(hidden_size=64, num_layers=2, num_heads=4), "model.layers.0.mlp.down_proj.lora_A.weight takes inputs "
                                                           "of 192, model.layers.0.mlp.down_proj.weight in"),
    (ModelSize(hidden_size=32, num_layers=3, num_heads=4), "has no model.layers.2."),
])
def test_merge_refuses_an_adapter_with_other_shapes(tmp_path, tokenizer, run_folder, size, expected):
    made = adapter(tokenizer, tmp_path / "adapter", size)
    with pytest.raises(UserError, match="an adapter of another model") as err:
        merge_lora(made, run_folder / "checkpoint", tmp_path / "merged")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_an_adapter_that_names_another_base(tmp_path, tokenizer, run_folder):
    other = tmp_path / "other-base"
    save_checkpoint(other, tiny(tokenizer, ModelSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=96)),
                    tokenizer, get_arm("qwen-ar"))
    made = adapter(tokenizer, tmp_path / "adapter")  # its tensors fit the given base; its config names the other
    config = json.loads((made / "adapter_config.json").read_text())
    (made / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    proc = cli("merge-lora", "--lora_path", made, "--base_model_path", run_folder / "checkpoint",
               "--merge_path", tmp_path / "merged")
    one_line(proc, f"the adapter was made for {other} (num_attention_heads 2), not for {run_folder / 'checkpoint'}")
    config["base_model_name_or_path"] = str(run_folder / "checkpoint")
    (made / "adapter_config.json").write_text(json.dumps(config))
    merged = merge_lora(made, run_folder / "checkpoint", tmp_path / "merged")
    assert (merged / "model.safetensors").exists()
