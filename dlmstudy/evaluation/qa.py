"""Exact-match accuracy on forward and reverse questions, through each arm's own sampler; token F1 for free-form answers."""

from __future__ import annotations

import json
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from dlmstudy.data.biographies import QAItem, qa_prompt
from dlmstudy.sampling import sample
from dlmstudy.sampling.end_tokens import cut_at_stop, end_tokens, stop_ids


@dataclass(frozen=True)
class DecodeSettings:
    """Sampler settings for the probes: diffusion uses all of them, AR decoding only gen_length.

    logits_eos_inf, confidence_eos_eot_inf: LLaDA's end-token options (sampling/diffusion.py), with the
    tokenizer's end tokens (`sampling.end_tokens`)."""

    steps: int = 16
    gen_length: int = 16
    block_length: int = 16
    batch_size: int = 32
    threshold: float | None = None
    compiled: bool = False
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False


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


def answer_questions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, items: list[QAItem], *,
                     sampler: str, settings: DecodeSettings,
                     prompt_fn: Callable[[QAItem], str] = qa_prompt) -> list[dict]:
    """Generate an answer for every item (left-padded batches); score exact match of its first line and the
    token F1 of the whole generated text (up to the first end token: EOS, padding, end of turn, any special
    token) against the expected output. Each row also says whether the answer is empty and how many tokens
    it has.

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
    ends, stops = end_tokens(tokenizer), stop_ids(tokenizer)
    rows = []
    for start in range(0, len(items), settings.batch_size):
        batch = items[start:start + settings.batch_size]
        enc = tokenizer(prompts[start:start + settings.batch_size], return_tensors="pt", add_special_tokens=False,
                        **padding)
        prompt, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        if sampler == "diffusion":
            opts = dict(steps=settings.steps, gen_length=settings.gen_length, block_length=settings.block_length,
                        mask_id=model.config.mask_token_id, threshold=settings.threshold, compiled=settings.compiled,
                        eos_id=list(ends.eos), eot_id=ends.eot, logits_eos_inf=settings.logits_eos_inf,
                        confidence_eos_eot_inf=settings.confidence_eos_eot_inf)
        else:
            opts = dict(max_new_tokens=settings.gen_length, eos_id=tokenizer.eos_token_id, compiled=settings.compiled)
        with torch.no_grad():
            out = sample(model, prompt, sampler=sampler, attention_mask=mask, **opts)
        answers = [cut_at_stop(row, stops) for row in out[:, prompt.shape[1]:].tolist()]
        for q, ids in zip(batch, answers):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            answer = extract_answer(text)
            rows.append({"person": q.person, "attribute": q.attribute, "direction": q.direction,
                         "question": q.instruction, "expected": q.output, "answer": answer,
                         "correct": answer == q.output, "f1": token_f1(text, q.output), "text": text,
                         "answer_tokens": len(ids), "empty": not text.strip()})
    return rows


def answer_summary(rows: list[dict]) -> dict[str, float]:
    """Exact-match accuracy, mean token F1, share of empty answers and mean answer length (tokens) of probe rows."""
    n = max(len(rows), 1)
    return {"accuracy": sum(r["correct"] for r in rows) / n, "answer_f1": sum(r["f1"] for r in rows) / n,
            "empty_answers": sum(r["empty"] for r in rows) / n,
            "answer_tokens": sum(r["answer_tokens"] for r in rows) / n}


def decode_grid(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, items: list[QAItem], *, sampler: str,
                settings: DecodeSettings, gen_lengths: list[int], block_lengths: list[int | str],
                end_options: dict[str, dict[str, bool]], prompt_fn: Callable[[QAItem], str] = qa_prompt) -> list[dict]:
    """`answer_summary` of the probes for every (gen_length, block_length, end-token option), one token a step
    (steps = gen_length; block_length "whole" = gen_length; block lengths that do not divide gen_length are
    skipped). AR decodes once per gen_length (block_length 1, end_tokens "none"). Also the seconds each took."""
    if sampler == "diffusion":
        grid = [(g, g if b == "whole" else b, name) for g in gen_lengths for b in block_lengths for name in end_options
                if b == "whole" or g % b == 0]
    else:
        grid = [(g, 1, "none") for g in gen_lengths]
    rows = []
    for gen_length, block_length, name in dict.fromkeys(grid):
        flags = {"logits_eos_inf": False, "confidence_eos_eot_inf": False, **end_options.get(name, {})}
        chosen = replace(settings, steps=gen_length, gen_length=gen_length, block_length=block_length, **flags)
        start = time.perf_counter()
        answers = answer_questions(model, tokenizer, items, sampler=sampler, settings=chosen, prompt_fn=prompt_fn)
        rows.append({"gen_length": gen_length, "block_length": block_length, "steps": gen_length, "end_tokens": name,
                     **answer_summary(answers), "seconds": time.perf_counter() - start})
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
