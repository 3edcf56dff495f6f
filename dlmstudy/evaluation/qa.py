"""Exact-match accuracy on forward and reverse questions, through each arm's own sampler; token F1 for free-form answers."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from dlmstudy.data.biographies import QAItem, qa_prompt
from dlmstudy.sampling import sample


@dataclass(frozen=True)
class DecodeSettings:
    """Sampler settings for the probes: diffusion uses all of them, AR decoding only gen_length."""

    steps: int = 16
    gen_length: int = 16
    block_length: int = 16
    batch_size: int = 32
    threshold: float | None = None
    compiled: bool = False


def extract_answer(text: str) -> str:
    """The answer is the generated text up to the first line break, stripped."""
    return text.split("\n", 1)[0].strip()


def _words(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: harmonic mean of word precision and recall after lower-casing and dropping punctuation
    and articles. Partial credit where exact match of a free-form (Alpaca) answer is almost always 0."""
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """Generated ids up to (not including) the first end-of-sequence token."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def answer_questions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, items: list[QAItem], *,
                     sampler: str, settings: DecodeSettings,
                     prompt_fn: Callable[[QAItem], str] = qa_prompt) -> list[dict]:
    """Generate an answer for every item (left-padded batches); score exact match of its first line and the
    token F1 of the whole generated text (up to EOS) against the expected output.

    `prompt_fn` renders an item: the plain "Question: ... Answer:" form after pretraining, the chat
    template after SFT. Compiled settings pad every batch to the longest prompt of all items, so one compiled
    graph serves every batch (a compile per prompt length would cost more than it saves at small batches).
    """
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    prompts = [prompt_fn(q) for q in items]
    padding = {"padding": True}
    if settings.compiled and prompts:
        longest = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])
        padding = {"padding": "max_length", "max_length": longest}
    rows = []
    for start in range(0, len(items), settings.batch_size):
        batch = items[start:start + settings.batch_size]
        enc = tokenizer(prompts[start:start + settings.batch_size], return_tensors="pt", add_special_tokens=False,
                        **padding)
        prompt, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        if sampler == "diffusion":
            opts = dict(steps=settings.steps, gen_length=settings.gen_length, block_length=settings.block_length,
                        mask_id=model.config.mask_token_id, threshold=settings.threshold, compiled=settings.compiled)
        else:
            opts = dict(max_new_tokens=settings.gen_length, eos_id=tokenizer.eos_token_id, compiled=settings.compiled)
        with torch.no_grad():
            out = sample(model, prompt, sampler=sampler, attention_mask=mask, **opts)
        texts = [tokenizer.decode(cut_at_eos(row, tokenizer.eos_token_id), skip_special_tokens=True)
                 for row in out[:, prompt.shape[1]:].tolist()]
        for q, text in zip(batch, texts):
            answer = extract_answer(text)
            rows.append({"person": q.person, "attribute": q.attribute, "direction": q.direction,
                         "question": q.instruction, "expected": q.output, "answer": answer,
                         "correct": answer == q.output, "f1": token_f1(text, q.output)})
    return rows


def save_answers(rows: list[dict], path: Path) -> None:
    """The probes' answers as JSON lines (eval/qa_samples.jsonl), for reading what a model said."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def accuracy_by_direction(rows: list[dict]) -> dict[str, float]:
    """Share of exact matches per direction (forward, reverse)."""
    out = {}
    for direction in ("forward", "reverse"):
        hits = [r["correct"] for r in rows if r["direction"] == direction]
        out[direction] = sum(hits) / len(hits) if hits else float("nan")
    return out
