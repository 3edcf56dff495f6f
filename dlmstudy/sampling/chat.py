"""`dlmstudy generate` and `dlmstudy chat`: answer a prompt, or hold a multi-turn chat, with the arm's sampler.

The logic runs without a terminal: a `Chatbot` turns chat messages into prompt ids (the tokenizer's
chat template; the oldest turns are dropped when the model's context is full), decodes them through
`sample` with the arm's sampler, and cuts the answer at the first end token (EOS, `<|im_end|>`, SFT padding
tokens, any special token). The diffusion sampler commits end tokens last by default
(`confidence_eos_eot_inf`), so an SFT'd LLaDA answers instead of filling its canvas with EOS. `run_chat` is the read-and-answer loop over any iterable of lines, and `step_lines`
shows the order in which an answer was unmasked (diffusion) or written (AR), one line per step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlmstudy.errors import UserError
from dlmstudy.models.checkpoints import folder_arm, load_pretrained
from dlmstudy.models.registry import Arm
from dlmstudy.runners.device import resolve_device, supports_bf16, synchronize
from dlmstudy.sampling.end_tokens import end_tokens, stop_ids
from dlmstudy.sampling.registry import sample

DEFAULT_BLOCK_LENGTH = 32
DIFFUSION_ONLY = ("steps", "block_length", "cfg", "remasking", "threshold", "use_cache", "logits_eos_inf",
                  "confidence_eos_eot_inf")
AR_ONLY = ("top_p",)
MASK_TEXT, END_TEXT = "[M]", "[E]"
EXIT_WORDS = ("exit", "quit")
CLEAR = "/clear"
Message = dict[str, str]


@dataclass
class DecodeOptions:
    """Decoding flags as given on the command line; None means "not given", so the default applies.

    max_length is the number of tokens to generate (gen_length of the diffusion sampler,
    max_new_tokens of AR decoding). Diffusion defaults: steps = max_length, block_length =
    min(32, max_length), cfg 0, low_confidence remasking, no threshold, no cache, EOS allowed
    (logits_eos_inf False), end tokens committed last (confidence_eos_eot_inf True; False under random
    remasking, which has no confidence); AR: top_p 1; both eager (compiled False).
    """

    max_length: int = 128
    temperature: float = 0.0
    steps: int | None = None
    block_length: int | None = None
    cfg: float | None = None
    remasking: str | None = None
    threshold: float | None = None
    use_cache: bool | None = None
    logits_eos_inf: bool | None = None
    confidence_eos_eot_inf: bool | None = None
    top_p: float | None = None
    compiled: bool = False

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> DecodeOptions:
        """The options among `flags` (e.g. `vars(argparse_namespace)`); other keys are ignored."""
        return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name in flags})

    def sampler_kwargs(self, arm: Arm) -> dict[str, Any]:
        """Keyword options for `sample(..., sampler=arm.sampler)`; a flag of the other sampler is a UserError."""
        if arm.sampler not in ("diffusion", "ar"):
            raise UserError(f"arm {arm.name!r} uses the {arm.sampler!r} sampler, which generate/chat do not know")
        foreign = DIFFUSION_ONLY if arm.sampler == "ar" else AR_ONLY
        given = [name for name in foreign if getattr(self, name) is not None]
        if given:
            other, own = ("diffusion", "autoregressively") if arm.sampler == "ar" else ("AR", "by diffusion")
            raise UserError(f"--{given[0]} is an option of {other} decoding, but this model (arm {arm.name}) "
                            f"decodes {own}")
        if arm.sampler == "ar":
            return {"max_new_tokens": self.max_length, "temperature": self.temperature,
                    "top_p": 1.0 if self.top_p is None else self.top_p, "compiled": self.compiled}

        def given_or(value, default):
            return default if value is None else value

        remasking = given_or(self.remasking, "low_confidence")
        return {"gen_length": self.max_length, "steps": given_or(self.steps, self.max_length),
                "block_length": given_or(self.block_length, min(DEFAULT_BLOCK_LENGTH, self.max_length)),
                "temperature": self.temperature, "cfg_scale": given_or(self.cfg, 0.0),
                "remasking": remasking, "threshold": self.threshold,
                "use_cache": bool(self.use_cache), "compiled": self.compiled,
                "logits_eos_inf": bool(self.logits_eos_inf),
                "confidence_eos_eot_inf": given_or(self.confidence_eos_eot_inf, remasking == "low_confidence")}


@dataclass
class Reply:
    """One answer: the prompt ids fed in, the generated ids, the step (from 0) that committed each, the text, and the
    sampler's wall time (seconds, the device synchronised)."""

    prompt_ids: list[int]
    tokens: list[int]
    unmask_step: list[int]
    num_steps: int
    text: str
    seconds: float = 0.0

    def speed_line(self) -> str:
        """Generated tokens (every position decoded, EOS padding included) per second of sampling."""
        rate = len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")
        return f"({len(self.tokens)} tokens in {self.num_steps} steps, {self.seconds:.2f} s: {rate:,.1f} tokens/s)"


def model_folder(path: str | Path) -> Path:
    """The model folder: `path` itself, or `path/checkpoint` of a finished run folder (one with result.json)."""
    path = Path(path)
    if (path / "result.json").exists():
        if not (path / "checkpoint").is_dir():
            raise UserError(f"{path}: finished run without a checkpoint/ folder")
        return path / "checkpoint"
    return path


def answer_text(tokenizer: PreTrainedTokenizerBase, tokens: list[int], stops: set[int]) -> str:
    """The generated text up to (without) the first stop token."""
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokenizer.decode(tokens[:cut]).strip()


class Chatbot:
    """A model with its tokenizer, arm and decoding options, answering a list of chat messages."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, arm: Arm,
                 options: DecodeOptions, *, chat_template: bool = True, seed: int = 0):
        if tokenizer is None:
            raise UserError("the model folder has no tokenizer (tokenizer.json or tokenizer_config.json)")
        if chat_template and not tokenizer.chat_template:
            raise UserError("the tokenizer has no chat template; pass --no_chat_template to use raw prompts")
        self.model, self.tokenizer, self.arm, self.chat_template = model, tokenizer, arm, chat_template
        self.kwargs = options.sampler_kwargs(arm)
        self.max_length = options.max_length
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.stops = stop_ids(tokenizer)
        self.generator = torch.Generator(device=model.device).manual_seed(seed)
        ends = end_tokens(tokenizer)
        if arm.sampler == "diffusion":
            mask_id = getattr(model.config, "mask_token_id", None)
            self.kwargs.update(mask_id=tokenizer.mask_token_id if mask_id is None else mask_id, return_history=True,
                               eos_id=list(ends.eos), eot_id=ends.eot)
        else:
            end_of_turn = ends.eot if chat_template else None
            self.kwargs["eos_id"] = tokenizer.eos_token_id if end_of_turn is None else end_of_turn

    @classmethod
    def load(cls, path: str | Path, *, options: DecodeOptions, device: str = "auto", seed: int = 0,
             chat_template: bool = True) -> Chatbot:
        """Load a checkpoint, finished run, LLaDA or HF Qwen2/Llama folder (bf16 on an accelerator that has it).

        The options are checked against the folder's arm before the weights load, so a wrong flag fails at once.
        """
        folder = model_folder(path)
        options.sampler_kwargs(folder_arm(folder))
        device = resolve_device(device)
        dtype = torch.bfloat16 if device != "cpu" and supports_bf16(device) else None
        model, tokenizer, arm = load_pretrained(folder, device=device, dtype=dtype)
        return cls(model, tokenizer, arm, options, chat_template=chat_template, seed=seed)

    def render(self, messages: list[Message]) -> list[int]:
        """Prompt ids: the chat template over all messages with the assistant header, or the last message raw."""
        if not self.chat_template:
            return self.tokenizer(messages[-1]["content"])["input_ids"]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The rendered prompt, dropping the oldest (user, assistant) pairs until it and the answer fit the context."""
        ids = self.render(messages)
        if not ids:
            raise UserError("the prompt is empty")
        while self.context and len(ids) + self.max_length > self.context and len(messages) > 2:
            messages = messages[2:]
            ids = self.render(messages)
        if self.context and len(ids) + self.max_length > self.context:
            raise UserError(f"the prompt ({len(ids)} tokens) and max_length {self.max_length} exceed the model's "
                            f"context of {self.context} positions")
        return ids

    def reply(self, messages: list[Message]) -> Reply:
        """Answer the conversation `messages` (ending with a user turn) with the arm's sampler."""
        ids = self.prompt_ids(messages)
        prompt = torch.tensor([ids], device=self.model.device)
        synchronize(self.model.device.type)
        start = time.perf_counter()
        out = sample(self.model, prompt, sampler=self.arm.sampler, generator=self.generator, **self.kwargs)
        synchronize(self.model.device.type)
        seconds = time.perf_counter() - start
        if self.arm.sampler == "diffusion":
            x, unmask_step = out
            order = unmask_step[0].tolist()
            num_steps = self.kwargs["steps"] if self.kwargs["threshold"] is None else max(order) + 1
        else:
            x = out
            order = list(range(x.shape[1] - len(ids)))
            num_steps = len(order)
        tokens = x[0, len(ids):].tolist()
        return Reply(ids, tokens, order, num_steps, answer_text(self.tokenizer, tokens, self.stops), seconds)

    def step_lines(self, reply: Reply) -> list[str]:
        """One line per step: its number, how many tokens it committed, and the answer so far.

        Masked positions show as [M] (diffusion; AR has none: its answer just grows), committed end
        tokens as [E], newlines as \\n.
        """
        pieces = [END_TEXT if t in self.stops else self.tokenizer.decode([t]).replace("\n", "\\n")
                  for t in reply.tokens]
        hidden = MASK_TEXT if self.arm.sampler == "diffusion" else ""
        width = len(str(reply.num_steps))
        lines = []
        for t in range(reply.num_steps):
            committed = sum(s == t for s in reply.unmask_step)
            text = "".join(piece if s <= t else hidden for piece, s in zip(pieces, reply.unmask_step))
            lines.append(f"step {t + 1:>{width}}/{reply.num_steps} +{committed} | {text}")
        return lines


def run_chat(bot: Chatbot, lines: Iterable[str], write: Callable[[str], None], *,
             show_steps: bool = False, show_speed: bool = False) -> list[Reply]:
    """Answer each line in turn, keeping the history; `exit`/`quit` or the end of `lines` ends, `/clear` forgets."""
    history: list[Message] = []
    replies = []
    for line in lines:
        text = line.strip()
        if text.lower() in EXIT_WORDS:
            break
        if text == CLEAR:
            history = []
            write("(history cleared)")
            continue
        if not text:
            continue
        messages = history + [{"role": "user", "content": text}]
        reply = bot.reply(messages)
        write(f"assistant> {reply.text}")
        if show_steps:
            for step in bot.step_lines(reply):
                write(step)
        if show_speed:
            write(reply.speed_line())
        history = messages + [{"role": "assistant", "content": reply.text}]
        replies.append(reply)
    return replies


def terminal_lines(stream: TextIO = sys.stdin, prompt: str = "user> ") -> Iterator[str]:
    """Lines from `stream`; on a terminal through `input` (with the prompt and line editing), else as piped."""
    if not stream.isatty():
        yield from stream
        return
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            return
