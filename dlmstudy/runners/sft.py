"""The SFT stage: each arm's pretrained model fine-tuned on Alpaca rows, evaluated after every epoch.

An SFT run is a run folder like any other (`runs/<study>/sft-<arm>_e<k>_<hash>/`), trained by the
same `fit` loop; its base is the arm's pretraining run (or a local model named in `sft.base`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dlmstudy.atomic import write_json_atomic, write_text_atomic
from dlmstudy.data.biographies import QAItem
from dlmstudy.data.packing import epoch_order
from dlmstudy.data.sft import (
    SFTCollator,
    SFTDataset,
    alpaca_messages,
    load_sft_dataset,
    padding_tokens,
    read_alpaca_rows,
)
from dlmstudy.data.sft_padding import PADDINGS
from dlmstudy.errors import UserError
from dlmstudy.evaluation.qa import (
    DecodeSettings,
    accuracy_by_direction,
    answer_questions,
    answer_summary,
    decode_grid,
    save_answers,
)
from dlmstudy.evaluation.sft_diagnostics import diagnostic_scalars, sft_diagnostics
from dlmstudy.evaluation.validation import LOSS_KIND, answer_nll
from dlmstudy.models.checkpoints import load_pretrained, save_checkpoint
from dlmstudy.models.registry import Arm, get_arm
from dlmstudy.runners.run import RESULT_FILE, default_arguments, fit
from dlmstudy.runners.study import Run, StudyData, fast_path, study_dir
from dlmstudy.study.plan import config_digest
from dlmstudy.sampling.end_tokens import end_tokens
from dlmstudy.study.spec import DIFFUSION_ONLY_KEYS, END_TOKEN_OPTIONS, SFTSpec, StudySpec
from dlmstudy.training.lora import apply_lora
from dlmstudy.training.registry import build_objective
from dlmstudy.training.tracking import finish_tracking


@dataclass
class SFTRun:
    """One fine-tuning: an arm, the folder it starts from, an epoch count, and its SFT settings (`sft`: the spec's
    section with the variant's keys, `variant`, set over it)."""

    run_id: str
    arm: Arm
    base: Path
    parent: str | None
    epochs: int
    config: dict
    dir: Path
    sft: SFTSpec | None = None
    variant: dict = field(default_factory=dict)
    stage: str = "sft"

    def ready(self) -> bool:
        """The base exists (a parent pretraining run must have finished first)."""
        return (self.base / "config.json").exists()


# What an SFT run's val_loss is: its training objective on the held-out rows. Only answer_nll compares arms.
SFT_LOSS_KIND = {"mdm": "SFT objective: LLaDA's masked loss over the answer and its EOS padding (not comparable with AR)",
                 "ar": "SFT objective: exact NLL of the answer and its EOS"}


# What only the diffusion sampler reads: left out of AR runs' configs, so AR runs do not multiply over them.
DIFFUSION_ONLY = {**{k: True for k in DIFFUSION_ONLY_KEYS},
                  "decoding": {"steps", "block_length", "logits_eos_inf", "confidence_eos_eot_inf"},
                  "decode_grid": {"block_length", "end_tokens"}}


def variant_label(keys: dict) -> str:
    """A run-id fragment naming a variant's training keys, e.g. `rainbow_token_s1`; "" for none (decoding keys
    change only the evaluation and are left out)."""
    parts = []
    for key, value in keys.items():
        if key in ("decoding", "decode_grid"):
            continue
        if key == "seed":
            parts.append(f"s{value}")
        elif isinstance(value, bool):
            parts.append(f"{key}-{str(value).lower()}")
        elif key in ("padding", "loss_norm"):
            parts.append(str(value))
        else:
            parts.append(f"{key}-{value}")
    return "_".join(parts).replace("/", "-").replace(" ", "")


def resolve_sft_runs(spec: StudySpec, runs: list[Run]) -> list[SFTRun]:
    """SFT runs for every SFT variant x epoch count x arm (x pretraining run, with `from_run: all`), in that order:
    arms innermost, so both arms of a variant finish together.

    Variant keys that only the diffusion arm reads (padding, loss normalisation, its decoding options) do not
    make separate runs of an AR arm: its variants that differ only in them are one run."""
    if spec.sft is None:
        return []
    sft = spec.sft
    bases = {}
    for name in spec.arms:
        if name in sft.base:
            bases[name] = [(Path(sft.base[name]), None)]
        else:
            own = [r for r in runs if r.arm.name == name]
            if sft.from_run == "most_unique":
                own = [max(own, key=lambda r: (r.unique_tokens, r.epochs, r.params.non_embedding))] if own else []
            bases[name] = [(r.dir / "checkpoint", r.run_id) for r in own]
    out, seen = [], set()
    for keys, variant in sft.expanded():
        seed = spec.seed if variant.seed is None else variant.seed
        for epochs in sft.epochs:
            for name in spec.arms:
                arm = get_arm(name)
                own_keys = keys if arm.objective == "mdm" else {k: v for k, v in keys.items()
                                                                 if k not in DIFFUSION_ONLY_KEYS}
                settings = variant.model_dump(exclude={"epochs": True, "base": True, "variants": True,
                                                       **({} if arm.objective == "mdm" else DIFFUSION_ONLY)})
                label = variant_label(own_keys)
                for base, parent in bases[name]:
                    config = {"stage": "sft", "study": spec.name, "arm": name, "base": str(base), "parent": parent,
                              "sft_epochs": epochs, "seed": seed, "sft": settings,
                              "training": {**variant.arguments}, "evaluation": spec.evaluation.identity()}
                    rid = f"sft-{name}_e{epochs}{'_' + label if label else ''}_{config_digest(config)}"
                    if rid not in seen:
                        seen.add(rid)
                        out.append(SFTRun(rid, arm, base, parent, epochs, config, study_dir(spec) / rid, variant,
                                          own_keys))
    return out


def sft_prompt(tokenizer, item: QAItem) -> str:
    """The chat-template prompt an SFT model answers (the user turn and the assistant header)."""
    messages = alpaca_messages({"instruction": item.instruction, "input": item.input, "output": item.output})[:1]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def longest_answer(spec: StudySpec) -> int:
    """The most tokens any SFT variant's probes generate (its decoding or its decode grid)."""
    return max(max([variant.decoding.gen_length or spec.evaluation.gen_length, *variant.decode_grid.gen_length])
               for _, variant in spec.sft.expanded())


def sft_splits(spec: StudySpec, data: StudyData, tokenizer):
    """(train rows, validation rows, probe items) for the SFT source."""
    sft = spec.sft
    cache = study_dir(spec) / "_cache"
    if sft.source == "builtin:biographies":
        rows = data.corpus.qa_train_rows
        if len(rows) <= sft.validation_rows:
            raise UserError(f"sft.validation_rows {sft.validation_rows} leaves no built-in SFT rows to train on")
        rng = np.random.default_rng(spec.seed)
        held = set(rng.choice(len(rows), sft.validation_rows, replace=False).tolist())
        dd = load_sft_dataset([r for i, r in enumerate(rows) if i not in held], tokenizer, max_length=sft.max_length,
                              cache_dir=cache, seed=spec.seed, progress=lambda m: None)
        val = load_sft_dataset([rows[i] for i in sorted(held)], tokenizer, max_length=sft.max_length,
                               cache_dir=cache, seed=spec.seed, progress=lambda m: None)["train"]
        return dd["train"], val, None
    dd = load_sft_dataset(sft.source, tokenizer, max_length=sft.max_length,
                          load_preprocessed_data=sft.load_preprocessed_data, cache_dir=cache, seed=spec.seed)
    if "test" not in dd:
        raise UserError(f"sft.source {sft.source}: no held-out rows; use the slice syntax, e.g. path[train:3000,test:200]")
    held_out = [] if sft.load_preprocessed_data else read_alpaca_rows(sft.source, seed=spec.seed).get("test", [])
    probes = [QAItem("", "answer", "held-out", r["instruction"], r["output"], r.get("input", "") or "")
              for r in held_out]
    room = sft.max_length - longest_answer(spec)  # a probe's prompt and answer fit the SFT context, as trained
    probes = [q for q in probes if len(tokenizer(sft_prompt(tokenizer, q), add_special_tokens=False)["input_ids"]) <= room]
    return dd["train"], dd["test"], probes[: sft.validation_rows]


def sft_decode_settings(spec: StudySpec, sft: SFTSpec) -> DecodeSettings:
    """The SFT probes' sampler settings: `sft.decoding` over `evaluation:`."""
    ev, dec = spec.evaluation, sft.decoding
    return DecodeSettings(dec.steps or ev.steps, dec.gen_length or ev.gen_length, dec.block_length or ev.block_length,
                          ev.batch_size, compiled=ev.compiled, logits_eos_inf=dec.logits_eos_inf,
                          confidence_eos_eot_inf=dec.confidence_eos_eot_inf)


def with_padding_tokens(model, tokenizer, sft: SFTSpec):
    """The tokenizer with the padding scheme's tokens and the tail ids; the model's embeddings grow (randomly
    initialised rows, distinct for each new token) when the new ids do not fit its rows."""
    tokenizer, tail_ids = padding_tokens(tokenizer, sft.padding, sft.pad_tokens)
    if max(tail_ids) >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    return tokenizer, tail_ids


def execute_sft_run(run: SFTRun, spec: StudySpec, data: StudyData, device: str, probes: list[QAItem],
                    progress=print) -> dict:
    """Fine-tune, evaluate after every epoch (validation loss, QA accuracy), save the (merged) model; then the
    diagnostics (eval/diagnostics.json) and the decode grid (eval/decode_grid.csv) of the final model."""
    run.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.dir / "run.json", {"run_id": run.run_id, **run.config})
    started = time.time()
    model, tokenizer, _ = load_pretrained(run.base, device="cpu", dtype=None if device == "cpu" else torch.bfloat16)
    tokenizer = tokenizer or data.tokenizer
    train_rows, val_rows, held_out = sft_splits(spec, data, tokenizer)
    probes = probes if held_out is None else held_out
    sft = run.sft or spec.sft
    seed = run.config["seed"]
    padding = PADDINGS[sft.padding]
    tail_ids = None
    if run.arm.objective == "mdm":
        tokenizer, tail_ids = with_padding_tokens(model, tokenizer, sft)
    if sft.lora:
        model = apply_lora(model, r=sft.r, lora_alpha=sft.lora_alpha, lora_dropout=sft.lora_dropout,
                           target_modules=sft.target_modules, seed=seed)
    train_set = SFTDataset(train_rows, epoch_order(len(train_rows), run.epochs, seed=seed))
    val_set = SFTDataset(val_rows, np.arange(len(val_rows)))
    collate = SFTCollator(tokenizer.eos_token_id, tail_ids, tail_ids is not None and padding.always_masked)
    fast = {k: v for k, v in fast_path(spec).items() if k != "compiled"}
    mask_id = getattr(model.config, "mask_token_id", None)  # the model's own (LLaDA-8B: 126,336), else the tokenizer's
    mask_id = tokenizer.mask_token_id if mask_id is None else mask_id
    objective = build_objective(run.arm.objective, seed=seed, **fast, **(
        {"mask_id": mask_id, "sft_norm": sft.loss_norm} if run.arm.objective == "mdm" else {}))
    config = {**run.config, "training": {"learning_rate": 1e-4, **run.config["training"]}}
    arguments = default_arguments(config, len(train_set), device)
    per_epoch = math.ceil(len(train_rows) / arguments["per_device_train_batch_size"] / arguments["gradient_accumulation_steps"])
    arguments.update(eval_steps=per_epoch, save_steps=per_epoch)
    if arguments.get("gradient_checkpointing"):  # non-reentrant: no input needs a gradient, on every transformers 5
        arguments.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = (arguments["per_device_train_batch_size"] * arguments["gradient_accumulation_steps"] * world
                       * sft.max_length)
    ev = spec.evaluation
    settings = sft_decode_settings(spec, sft)

    held = collate([val_set[i] for i in range(len(val_set))])

    @torch.no_grad()
    def after_epoch(m, samples: Path | None = None) -> dict[str, float]:
        """The SFT objective and the answer NLL (comparable across arms) on the held-out rows; the probes' answers."""
        losses = [objective(m, {k: v.to(next(m.parameters()).device) for k, v in collate(
                  [val_set[i] for i in range(s, min(s + ev.batch_size, len(val_set)))]).items()})[0].item()
                  for s in range(0, len(val_set), ev.batch_size)]
        out = {"val_loss": float(np.mean(losses)),
               **answer_nll(m, run.arm.objective, held["input_ids"], held["attention_mask"], held["labels"],
                            mask_id=mask_id, mc_num=ev.mc_num, batch_size=ev.batch_size,
                            seed=spec.seed)}
        if probes:
            rows = answer_questions(m, tokenizer, probes, sampler=run.arm.sampler, settings=settings,
                                    prompt_fn=lambda q: sft_prompt(tokenizer, q))
            out.update(answer_summary(rows))
            out.update({f"accuracy_{d}": a for d, a in accuracy_by_direction(rows).items() if a == a})
            if samples is not None:
                save_answers(rows, samples)
        return out

    trained, train_metrics = fit(model, run_id=run.run_id, run_dir=run.dir, arguments=arguments, train_set=train_set,
                                 eval_set=val_set, objective=objective, data_collator=collate,
                                 tokens_per_step=tokens_per_step,
                                 validation_fn=after_epoch, spec=spec, config=config, progress=progress)
    if sft.lora:
        trained.save_pretrained(run.dir / "adapter")
        trained = trained.merge_and_unload()
    save_checkpoint(run.dir / "checkpoint", trained, tokenizer, run.arm)
    trained.eval()
    final = after_epoch(trained, samples=run.dir / "eval" / "qa_samples.jsonl")
    finish_tracking(final)
    ends = end_tokens(tokenizer)
    (run.dir / "eval").mkdir(exist_ok=True)
    diagnostics = sft_diagnostics(trained, run.arm.objective, [val_rows[i] for i in range(len(val_rows))], ends,
                                  mask_id=mask_id, pad_id=tokenizer.pad_token_id, mc_num=ev.mc_num,
                                  batch_size=ev.batch_size, seed=spec.seed)
    write_json_atomic(run.dir / "eval" / "diagnostics.json", diagnostics)
    grid = sft.decode_grid
    if probes and grid.gen_length:
        rows = decode_grid(trained, tokenizer, probes, sampler=run.arm.sampler, settings=settings,
                           gen_lengths=grid.gen_length, block_lengths=grid.block_length,
                           end_options={name: END_TOKEN_OPTIONS[name] for name in grid.end_tokens},
                           prompt_fn=lambda q: sft_prompt(tokenizer, q))
        write_text_atomic(run.dir / "eval" / "decode_grid.csv", pd.DataFrame(rows).to_csv(index=False))
    result = {"run_id": run.run_id, "stage": "sft", "arm": run.arm.name, "objective": run.arm.objective,
              "parent": run.parent, "base": str(run.base), "sft_epochs": run.epochs, "lora": sft.lora,
              "seed": seed, "variant": run.variant,
              **({"padding": sft.padding, "loss_norm": sft.loss_norm} if run.arm.objective == "mdm" else {}),
              "decoding": {"steps": settings.steps, "gen_length": settings.gen_length,
                           **({"block_length": settings.block_length, "logits_eos_inf": settings.logits_eos_inf,
                               "confidence_eos_eot_inf": settings.confidence_eos_eot_inf}
                              if run.arm.sampler == "diffusion" else {})},
              "train_rows": len(train_rows), "val_loss_kind": SFT_LOSS_KIND[run.arm.objective],
              "final_val_loss": final["val_loss"], "answer_nll_kind": f"{LOSS_KIND[run.arm.objective]} of answer tokens",
              **{k: v for k, v in final.items() if k.startswith(("accuracy", "answer_", "empty_"))},
              **diagnostic_scalars(diagnostics),
              **train_metrics, "wall_time_s": time.time() - started, "device": device}
    write_json_atomic(run.dir / RESULT_FILE, result)
    return result
