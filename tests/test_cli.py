"""The names users type: dllm's and transformers' flag names, errors in those names, a subcommand's own usage,
--version."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlmstudy import __version__
from dlmstudy.cli import main
from dlmstudy.data.tokenizer import special_tokens, train_bpe
from dlmstudy.models.backbones import ModelSize, build_config, build_model
from dlmstudy.models.checkpoints import save_checkpoint
from dlmstudy.models.registry import get_arm

TEXTS = ["Alice was born in Paris. She works as a doctor and likes tea."] * 20


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    for name in ("llada-mdm", "qwen-ar"):
        arm = get_arm(name)
        config = build_config(arm.backbone, ModelSize(hidden_size=32, num_layers=1, num_heads=2),
                              special_tokens(tokenizer), causal=arm.causal)
        save_checkpoint(root / name, build_model(config, seed=0).eval(), tokenizer, arm)
    return {name: root / name for name in ("llada-mdm", "qwen-ar")}


def error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"dlmstudy {__version__}"


@pytest.mark.parametrize("command", [["plan"], ["eval", "--tasks", "bio_mc"],
                                     ["generate", "--prompt", "hi", "--model_name_or_path", "m"]])
def test_an_unknown_flag_prints_the_subcommands_usage(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*command, "--no_such_flag"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith(f"usage: dlmstudy {command[0]} ")
    assert err.strip().splitlines()[-1] == f"dlmstudy {command[0]}: error: unrecognized arguments: --no_such_flag"


def test_tutorial_flag_names_decode_and_errors_speak_them(folders, capsys):
    diffusion = ["generate", "--model_name_or_path", str(folders["llada-mdm"]), "--prompt", "hi", "--device", "cpu"]
    assert main([*diffusion, "--max_new_tokens", "4", "--block_size", "2", "--steps", "2"]) == 0
    assert main([*diffusion, "--max_new_tokens", "6", "--block_size", "4"]) == 2
    assert error_line(capsys) == "dlmstudy: error: --max_new_tokens 6 is not divisible by --block_size 4"
    assert main([*diffusion, "--gen_length", "6", "--block_length", "4"]) == 2
    assert error_line(capsys) == "dlmstudy: error: --gen_length 6 is not divisible by --block_length 4"
    assert main([*diffusion, "--block_size", "4", "--steps", "3", "--max_length", "8"]) == 2
    assert error_line(capsys) == ("dlmstudy: error: steps 3 is not divisible by the number of blocks 2 "
                                  "(--max_length / --block_size)")
    ar = ["generate", "--model_name_or_path", str(folders["qwen-ar"]), "--prompt", "hi", "--device", "cpu"]
    assert main([*ar, "--max_new_tokens", "3"]) == 0
    assert main([*ar, "--block_size", "4"]) == 2
    assert error_line(capsys) == ("dlmstudy: error: --block_size is an option of diffusion decoding, but this model "
                                  "(arm qwen-ar) decodes autoregressively")
    assert main([*ar, "--max_new_tokens", "0"]) == 2
    assert error_line(capsys) == "dlmstudy: error: --max_new_tokens must be >= 1, got 0"


def test_other_commands_keep_their_messages(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ngrid: {unique_tokens: [4096], epochs: [1]}\nevaluation: {block_length: 0}\n")
    assert main(["plan", str(spec)]) == 2
    assert "evaluation.block_length" in error_line(capsys)  # a spec key, not a flag
