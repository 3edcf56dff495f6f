"""Why an SFT'd LLaDA answers only EOS, separated on CPU in minutes (docs/training.md, "EOS after SFT").

A tiny LLaDA and its AR twin are fine-tuned (full fine-tuning from random weights) on the same Alpaca rows until
they know the answers, with each padding scheme x loss normalisation; at two points of training (the model
still weak, then knowing most answers) both are probed on those rows. So the answers' content is known to the
model to a measured degree (teacher-forced first-token rank, content NLL), and what remains is how training
pads and how decoding commits: the padding's end-token probabilities on an all-mask canvas, and the answers
under LLaDA's end-token options at block lengths 1, 4 and whole, answer lengths 16 and 64.

    PYTHONPATH=. python experiments/sft_eos_cpu.py --out /tmp/sft-eos-cpu [--rows 128] [--steps 100 300]

Writes results.csv (one row per variant, training point and decoding setting), diagnostics.json and a summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import lzma
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dlmstudy.data.biographies import QAItem
from dlmstudy.data.sft import SFTCollator, alpaca_messages, padding_tokens, tokenize_messages
from dlmstudy.data.sft_padding import PADDINGS
from dlmstudy.data.tokenizer import get_tokenizer, special_tokens
from dlmstudy.evaluation.qa import DecodeSettings, answer_questions, answer_summary
from dlmstudy.evaluation.sft_diagnostics import diagnostic_scalars, sft_diagnostics
from dlmstudy.models.backbones import ModelSize, build_config, build_model
from dlmstudy.sampling.end_tokens import end_tokens
from dlmstudy.study.spec import END_TOKEN_OPTIONS
from dlmstudy.training.objectives import ARObjective, MDMObjective

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "instructions-alpaca.jsonl.xz"


def load_rows(n: int, max_answer_chars: int = 120, max_prompt_chars: int = 240) -> list[dict]:
    """The first `n` Alpaca rows (in file order) with short prompts and answers."""
    rows = []
    with lzma.open(DATA, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            prompt_chars = len(row["instruction"]) + len(row.get("input") or "")
            if len(row["output"]) <= max_answer_chars and prompt_chars <= max_prompt_chars:
                rows.append(row)
            if len(rows) == n:
                break
    return rows


def prompt_of(tokenizer, item: QAItem) -> str:
    messages = alpaca_messages({"instruction": item.instruction, "input": item.input, "output": item.output})[:1]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def train(model, objective, features: list[dict], collate, steps: list[int], batch: int, lr: float, seed: int):
    """Full fine-tuning in a fixed shuffled order; yields (step, model) at each step in `steps`."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(features)) for _ in range(1 + steps[-1] * batch // len(features))])
    model.train()
    for step in range(1, steps[-1] + 1):
        idx = order[(step - 1) * batch: step * batch]
        b = collate([{**features[i], "index": (step - 1) * batch + k} for k, i in enumerate(idx)])
        loss, _ = objective(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in steps:
            model.eval()
            yield step, loss.item(), model
            model.train()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--max_prompt_chars", type=int, default=240, help="longer prompts: longer EOS tails in a batch")
    p.add_argument("--probes", type=int, default=48)
    p.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--paddings", nargs="+", default=list(PADDINGS))
    p.add_argument("--norms", nargs="+", default=["sequence", "token"])
    p.add_argument("--gen", type=int, nargs="+", default=[16, 64])
    p.add_argument("--blocks", nargs="+", default=["1", "4", "whole"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rows = load_rows(a.rows, max_prompt_chars=a.max_prompt_chars)
    base_tok = get_tokenizer("bpe", texts=[r["instruction"] + " " + (r.get("input") or "") + " " + r["output"]
                                           for r in rows] * 2, vocab_size=1024)
    items = [QAItem("", "answer", "train", r["instruction"], r["output"], r.get("input") or "") for r in rows]
    size = ModelSize(hidden_size=128, num_layers=2, num_heads=4)
    records, diagnostics = [], {}
    variants = [("ar", "-", "-")] + [("mdm", pad, norm) for pad, norm in itertools.product(a.paddings, a.norms)]
    for objective_name, padding, norm in variants:
        tok, tail = (base_tok, None) if objective_name == "ar" else padding_tokens(base_tok, padding, 7)
        features = [tokenize_messages(alpaca_messages(r), tok) for r in rows]
        tokens = special_tokens(tok)
        causal = objective_name == "ar"
        model = build_model(build_config("qwen" if causal else "llada", size, tokens, causal=causal), seed=a.seed)
        if causal:
            objective, collate = ARObjective(), SFTCollator(tok.eos_token_id)
        else:
            objective = MDMObjective(mask_id=tok.mask_token_id, sft_norm=norm, seed=a.seed)
            collate = SFTCollator(tok.eos_token_id, tail, PADDINGS[padding].always_masked)
        probes = items[: a.probes]
        ends = end_tokens(tok)
        started = time.time()
        for step, loss, m in train(model, objective, features, collate, a.steps, a.batch, a.lr, a.seed):
            tag = f"{objective_name}/{padding}/{norm}/{step}"
            with torch.no_grad():
                diag = sft_diagnostics(m, objective_name, features[: a.probes], ends, mask_id=tok.mask_token_id,
                                       pad_id=tok.pad_token_id, mc_num=8, batch_size=48)
            diagnostics[tag] = diag
            common = {"objective": objective_name, "padding": padding, "loss_norm": norm, "step": step,
                      "train_loss": loss, **diagnostic_scalars(diag)}
            settings = [(g, 1, "none") for g in a.gen] if causal else [
                (g, g if b == "whole" else int(b), e) for g in a.gen for b in a.blocks
                for e in ("none", "logits_eos_inf", "confidence_eos_eot_inf") if b == "whole" or g % int(b) == 0]
            for gen, block, end in settings:
                flags = {"logits_eos_inf": False, "confidence_eos_eot_inf": False, **END_TOKEN_OPTIONS[end]}
                s = DecodeSettings(steps=gen, gen_length=gen, block_length=block, batch_size=a.probes, **flags)
                with torch.no_grad():
                    answers = answer_questions(m, tok, probes, sampler="ar" if causal else "diffusion", settings=s,
                                               prompt_fn=lambda q: prompt_of(tok, q))
                records.append({**common, "gen_length": gen, "block_length": block, "end_tokens": end,
                                **answer_summary(answers)})
            print(f"{tag}: loss {loss:.3f}, {time.time() - started:.0f} s, "
                  f"{json.dumps({k: round(v, 3) for k, v in diagnostic_scalars(diag).items()})}", flush=True)
            pd.DataFrame(records).to_csv(out / "results.csv", index=False)
            (out / "diagnostics.json").write_text(json.dumps(diagnostics, indent=1))


if __name__ == "__main__":
    main()
