"""Exact-match accuracy on forward and reverse questions, through each arm's own sampler."""

from __future__ import annotations

from dataclasses import dataclass
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


def extract_answer(text: str) -> str:
    """The answer is the generated text up to the first line break, stripped."""
    return text.split("\n", 1)[0].strip()


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """Generated ids up to (not including) the first end-of-sequence token."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def answer_questions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, items: list[QAItem], *,
                     sampler: str, settings: DecodeSettings,
                     prompt_fn: Callable[[QAItem], str] = qa_prompt) -> list[dict]:
    """Generate an answer for every item (left-padded batches) and score exact match.

    `prompt_fn` renders an item: the plain "Question: ... Answer:" form after pretraining, the chat
    template after SFT.
    """
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    rows = []
    for start in range(0, len(items), settings.batch_size):
        batch = items[start:start + settings.batch_size]
        enc = tokenizer([prompt_fn(q) for q in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        prompt, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        if sampler == "diffusion":
            opts = dict(steps=settings.steps, gen_length=settings.gen_length, block_length=settings.block_length,
                        mask_id=model.config.mask_token_id, threshold=settings.threshold)
        else:
            opts = dict(max_new_tokens=settings.gen_length, eos_id=tokenizer.eos_token_id)
        with torch.no_grad():
            out = sample(model, prompt, sampler=sampler, attention_mask=mask, **opts)
        texts = [tokenizer.decode(cut_at_eos(row, tokenizer.eos_token_id), skip_special_tokens=True)
                 for row in out[:, prompt.shape[1]:].tolist()]
        for q, text in zip(batch, texts):
            answer = extract_answer(text)
            rows.append({"person": q.person, "attribute": q.attribute, "direction": q.direction,
                         "question": q.instruction, "expected": q.output, "answer": answer,
                         "correct": answer == q.output})
    return rows


def accuracy_by_direction(rows: list[dict]) -> dict[str, float]:
    """Share of exact matches per direction (forward, reverse)."""
    out = {}
    for direction in ("forward", "reverse"):
        hits = [r["correct"] for r in rows if r["direction"] == direction]
        out[direction] = sum(hits) / len(hits) if hits else float("nan")
    return out
