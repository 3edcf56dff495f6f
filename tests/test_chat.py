"""`dlmstudy generate` and `dlmstudy chat`: decoding options per arm, prompts from the chat history, answers cut at
the end token, the step-by-step view, and two CLI runs (each CLI start costs seconds, so the rest is in-process)."""

from __future__ import annotations

import os
import types
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlmstudy.cli import main
from dlmstudy.data.tokenizer import EOS, IM_END, special_tokens, train_bpe
from dlmstudy.errors import UserError
from dlmstudy.models.backbones import ModelSize, build_config, build_model
from dlmstudy.models.checkpoints import save_checkpoint
from dlmstudy.models.registry import get_arm
from dlmstudy.sampling.chat import Chatbot, DecodeOptions, Reply, answer_text, model_folder, run_chat

TEXTS = ["Alice was born in Paris. She works as a doctor and likes tea.",
         "Bob lives in Rome, plays the piano and writes short stories."] * 10


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny diffusion and AR checkpoints sharing one tiny BPE tokenizer (chat template included)."""
    root = tmp_path_factory.mktemp("chat")
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    out = {}
    for name in ("llada-mdm", "qwen-ar"):
        arm = get_arm(name)
        config = build_config(arm.backbone, ModelSize(hidden_size=32, num_layers=2, num_heads=4),
                              special_tokens(tokenizer), causal=arm.causal)
        save_checkpoint(root / name, build_model(config, seed=0).eval(), tokenizer, arm)
        out[name] = root / name
    return out


def bot(folders, name: str, **options) -> Chatbot:
    return Chatbot.load(folders[name], options=DecodeOptions(**options), device="cpu", seed=0)


def test_options_follow_the_arm():
    diffusion, ar = get_arm("llada-mdm"), get_arm("qwen-ar")
    kwargs = DecodeOptions(max_length=16).sampler_kwargs(diffusion)
    assert (kwargs["gen_length"], kwargs["steps"], kwargs["block_length"]) == (16, 16, 16)
    assert kwargs["confidence_eos_eot_inf"] is True and kwargs["logits_eos_inf"] is False  # end tokens last
    assert DecodeOptions(remasking="random").sampler_kwargs(diffusion)["confidence_eos_eot_inf"] is False
    assert DecodeOptions(confidence_eos_eot_inf=False, logits_eos_inf=True).sampler_kwargs(diffusion) | {} == {
        **kwargs, "gen_length": 128, "steps": 128, "block_length": 32, "confidence_eos_eot_inf": False,
        "logits_eos_inf": True}
    with pytest.raises(UserError, match="--logits_eos_inf is an option of diffusion decoding"):
        DecodeOptions(logits_eos_inf=True).sampler_kwargs(ar)
    assert DecodeOptions(max_length=64, steps=8).sampler_kwargs(diffusion)["block_length"] == 32
    assert DecodeOptions(max_length=9, top_p=None).sampler_kwargs(ar) == {
        "max_new_tokens": 9, "temperature": 0.0, "top_p": 1.0, "compiled": False}
    assert DecodeOptions(compiled=True).sampler_kwargs(diffusion)["compiled"] is True
    with pytest.raises(UserError, match="--cfg is an option of diffusion decoding"):
        DecodeOptions(cfg=0.0).sampler_kwargs(ar)
    with pytest.raises(UserError, match="--top_p is an option of AR decoding"):
        DecodeOptions(top_p=0.9).sampler_kwargs(diffusion)
    assert DecodeOptions.from_flags({"max_length": 5, "use_cache": True, "prompt": "x"}) == DecodeOptions(
        max_length=5, use_cache=True)


def test_run_folder_means_its_checkpoint(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    assert model_folder(tmp_path) == tmp_path
    (tmp_path / "result.json").write_text("{}")
    assert model_folder(tmp_path) == tmp_path / "checkpoint"


def test_diffusion_reply_follows_the_schedule(folders):
    torch.manual_seed(0)
    b = bot(folders, "llada-mdm", max_length=12, steps=6, block_length=6)
    reply = b.reply([{"role": "user", "content": "Where was Alice born?"}])
    assert len(reply.tokens) == 12 and reply.num_steps == 6
    # two blocks of 6 over 3 steps each: 2 tokens a step, the first block's steps before the second's
    assert [reply.unmask_step.count(t) for t in range(6)] == [2] * 6
    assert max(reply.unmask_step[:6]) < min(reply.unmask_step[6:])
    lines = b.step_lines(reply)
    assert len(lines) == 6 and all(line.startswith(f"step {t + 1}/6 +2 | ") for t, line in enumerate(lines))
    assert [line.count("[M]") for line in lines] == [10, 8, 6, 4, 2, 0]


def test_ar_reply_respects_max_length_and_shows_one_token_a_step(folders):
    b = bot(folders, "qwen-ar", max_length=7)
    reply = b.reply([{"role": "user", "content": "Where does Bob live?"}])
    assert 1 <= len(reply.tokens) <= 7 and reply.unmask_step == list(range(len(reply.tokens)))
    lines = b.step_lines(reply)
    assert len(lines) == len(reply.tokens) and "[M]" not in "".join(lines)
    texts = [line.split(" | ", 1)[1] for line in lines]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))  # the answer only grows


def test_answer_is_cut_at_the_end_token_and_steps_render_by_hand(folders):
    b = bot(folders, "llada-mdm", max_length=4, steps=3, block_length=4)
    tok = b.tokenizer
    a, c = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    eos, im_end = tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(IM_END)
    reply = Reply(prompt_ids=[a], tokens=[a, c, im_end, a], unmask_step=[1, 0, 2, 0], num_steps=3, text="")
    assert b.step_lines(reply) == ["step 1/3 +2 | [M]B[M]A", "step 2/3 +1 | AB[M]A", "step 3/3 +1 | AB[E]A"]
    assert answer_text(tok, [a, c, im_end, a], b.stops) == "AB"
    assert answer_text(tok, [c, eos, a], b.stops) == "B"


def test_chat_keeps_history_clears_and_exits(folders):
    b = bot(folders, "qwen-ar", max_length=4)
    out: list[str] = []
    replies = run_chat(b, ["Where was Alice born?\n", "And Bob?\n", "/clear\n", "Who plays piano?\n", "quit\n",
                           "never read\n"], out.append)
    assert len(replies) == 3 and sum(line.startswith("assistant> ") for line in out) == 3
    second = b.tokenizer.decode(replies[1].prompt_ids)
    assert second.index("Where was Alice born?") < second.index(replies[0].text) < second.index("And Bob?")
    assert second.count("<|im_start|>user") == 2 and second.endswith("<|im_start|>assistant\n")
    third = b.tokenizer.decode(replies[2].prompt_ids)
    assert "Alice" not in third and third.count("<|im_start|>user") == 1
    assert len(run_chat(b, ["hi"], out.append)) == 1  # the end of input ends the chat too


def test_old_turns_are_dropped_to_fit_the_context(folders):
    b = bot(folders, "qwen-ar", max_length=4)
    history = [{"role": "user", "content": "Where was Alice born?"}, {"role": "assistant", "content": "Paris"},
               {"role": "user", "content": "And Bob?"}]
    full = len(b.prompt_ids(history))
    b.context = full + 3  # one answer of 4 no longer fits beside the whole history
    assert b.tokenizer.decode(b.prompt_ids(history)).count("<|im_start|>user") == 1
    b.context = 5
    with pytest.raises(UserError, match="exceed the model's context of 5"):
        b.prompt_ids(history)


def test_raw_prompt_and_missing_template(folders):
    b = Chatbot.load(folders["qwen-ar"], options=DecodeOptions(max_length=4), device="cpu", chat_template=False)
    history = [{"role": "user", "content": "old"}, {"role": "assistant", "content": "x"},
               {"role": "user", "content": "Bob lives in"}]
    assert b.prompt_ids(history) == b.tokenizer("Bob lives in")["input_ids"]
    b.tokenizer.chat_template = None
    with pytest.raises(UserError, match="--no_chat_template"):
        Chatbot(b.model, b.tokenizer, b.arm, DecodeOptions(), chat_template=True)


def test_wrong_flag_or_folder_is_one_line_exit_2(folders, tmp_path, capsys):
    assert main(["generate", "--model_name_or_path", str(folders["qwen-ar"]), "--prompt", "hi", "--cfg", "1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dlmstudy: error: --cfg is an option of diffusion decoding, but this model (arm qwen-ar) "
                   "decodes autoregressively"]
    missing = tmp_path / "missing"
    assert main(["chat", "--model_name_or_path", str(missing), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"dlmstudy: error: model folder not found: {missing}"]


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "dlmstudy.cli", *args, "--device", "cpu"], input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_generate_shows_every_step(folders):
    run = cli("generate", "--model_name_or_path", str(folders["llada-mdm"]), "--prompt", "Where was Alice born?",
              "--max_length", "8", "--steps", "8", "--block_length", "8", "--show_steps")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 8 and lines[-8:] == steps  # the answer, then one line per step
    assert [line.split(" | ")[0] for line in steps] == [f"step {t}/8 +1" for t in range(1, 9)]


def test_cli_chat_through_a_pipe(folders):
    run = cli("chat", "--model_name_or_path", str(folders["qwen-ar"]), "--max_length", "6",
              stdin="Where was Alice born?\nAnd Bob?\nexit\nnot read\n")
    assert run.returncode == 0, run.stderr
    assert sum(line.startswith("assistant> ") for line in run.stdout.splitlines()) == 2


class EOSOverflow(torch.nn.Module):
    """A diffusion 'model' with LLaDA's EOS overflow: the first two answer positions predict "A" (EOS second), every
    later one EOS, and a position right before a committed EOS predicts EOS too, confidently."""

    def __init__(self, model, start: int, eos: int, token: int):
        super().__init__()
        self.model, self.config, self.start, self.eos, self.token = model, model.config, start, eos, token

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        logits[..., self.token] = 5.0
        logits[:, self.start:, self.eos] = 4.0
        logits[:, self.start + 2:, self.eos] = 10.0
        before_eos = torch.zeros_like(input_ids, dtype=torch.bool)
        before_eos[:, :-1] = input_ids[:, 1:] == self.eos
        logits[..., self.eos] = logits[..., self.eos].masked_fill(before_eos, 10.0)
        return types.SimpleNamespace(logits=logits)


def test_an_sft_style_eos_overflow_answers_by_default_and_empty_without_the_option(folders):
    base = bot(folders, "llada-mdm", max_length=8)
    tok, messages = base.tokenizer, [{"role": "user", "content": "Where was Alice born?"}]
    start = len(base.prompt_ids(messages))
    model = EOSOverflow(base.model, start, tok.eos_token_id, tok.convert_tokens_to_ids("A"))
    answered = Chatbot(model, tok, base.arm, DecodeOptions(max_length=8, steps=8, block_length=8)).reply(messages)
    assert answered.text == "AA"
    plain = DecodeOptions(max_length=8, steps=8, block_length=8, confidence_eos_eot_inf=False)
    assert Chatbot(model, tok, base.arm, plain).reply(messages).text == ""  # EOS from the back fills the canvas
