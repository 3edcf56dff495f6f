"""The SFT stage: each arm's pretrained model fine-tuned on Alpaca rows, evaluated after every epoch.

An SFT run is a run folder like any other (`runs/<study>/sft-<arm>_e<k>_<hash>/`), trained by the
same `fit` loop; its base is the arm's pretraining run (or a local model named in `sft.base`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dlmstudy.atomic import write_json_atomic
from dlmstudy.data.biographies import QAItem
from dlmstudy.data.packing import epoch_order
from dlmstudy.data.sft import (
    SFTCollator,
    SFTDataset,
    alpaca_messages,
    load_sft_dataset,
    read_alpaca_rows,
)
from dlmstudy.errors import UserError
from dlmstudy.evaluation.qa import (
    DecodeSettings,
    accuracy_by_direction,
    answer_questions,
    save_answers,
)
from dlmstudy.evaluation.validation import LOSS_KIND, answer_nll
from dlmstudy.models.checkpoints import load_pretrained, save_checkpoint
from dlmstudy.models.registry import Arm, get_arm
from dlmstudy.runners.run import RESULT_FILE, default_arguments, fit
from dlmstudy.runners.study import Run, StudyData, fast_path, study_dir
from dlmstudy.study.plan import config_digest
from dlmstudy.study.spec import StudySpec
from dlmstudy.training.lora import apply_lora
from dlmstudy.training.registry import build_objective
from dlmstudy.training.tracking import finish_tracking


@dataclass
class SFTRun:
    """One fine-tuning: an arm, the folder it starts from, an epoch count."""

    run_id: str
    arm: Arm
    base: Path
    parent: str | None
    epochs: int
    config: dict
    dir: Path
    stage: str = "sft"

    def ready(self) -> bool:
        """The base exists (a parent pretraining run must have finished first)."""
        return (self.base / "config.json").exists()


# What an SFT run's val_loss is: its training objective on the held-out rows. Only answer_nll compares arms.
SFT_LOSS_KIND = {"mdm": "SFT objective: LLaDA's masked loss over the answer and its EOS padding (not comparable with AR)",
                 "ar": "SFT objective: exact NLL of the answer and its EOS"}


def resolve_sft_runs(spec: StudySpec, runs: list[Run]) -> list[SFTRun]:
    """SFT runs for every arm x SFT epoch count (x pretraining run, with `from_run: all`)."""
    if spec.sft is None:
        return []
    sft = spec.sft
    out = []
    for name in spec.arms:
        arm = get_arm(name)
        if name in sft.base:
            bases = [(Path(sft.base[name]), None)]
        else:
            own = [r for r in runs if r.arm.name == name]
            if sft.from_run == "most_unique":
                own = [max(own, key=lambda r: (r.unique_tokens, r.epochs, r.params.non_embedding))] if own else []
            bases = [(r.dir / "checkpoint", r.run_id) for r in own]
        for base, parent in bases:
            for epochs in sft.epochs:
                config = {"stage": "sft", "study": spec.name, "arm": name, "base": str(base), "parent": parent,
                          "sft_epochs": epochs, "seed": spec.seed, "sft": sft.model_dump(exclude={"epochs", "base"}),
                          "training": {**sft.arguments}, "evaluation": spec.evaluation.identity()}
                rid = f"sft-{name}_e{epochs}_{config_digest(config)}"
                out.append(SFTRun(rid, arm, base, parent, epochs, config, study_dir(spec) / rid))
    return out


def sft_prompt(tokenizer, item: QAItem) -> str:
    """The chat-template prompt an SFT model answers (the user turn and the assistant header)."""
    messages = alpaca_messages({"instruction": item.instruction, "input": item.input, "output": item.output})[:1]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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
    room = sft.max_length - spec.evaluation.gen_length  # a probe's prompt and answer fit the SFT context, as trained
    probes = [q for q in probes if len(tokenizer(sft_prompt(tokenizer, q), add_special_tokens=False)["input_ids"]) <= room]
    return dd["train"], dd["test"], probes[: sft.validation_rows]


def execute_sft_run(run: SFTRun, spec: StudySpec, data: StudyData, device: str, probes: list[QAItem],
                    progress=print) -> dict:
    """Fine-tune, evaluate after every epoch (validation loss, QA accuracy), save the (merged) model."""
    run.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.dir / "run.json", {"run_id": run.run_id, **run.config})
    started = time.time()
    model, tokenizer, _ = load_pretrained(run.base, device="cpu", dtype=None if device == "cpu" else torch.bfloat16)
    tokenizer = tokenizer or data.tokenizer
    train_rows, val_rows, held_out = sft_splits(spec, data, tokenizer)
    probes = probes if held_out is None else held_out
    sft = spec.sft
    if sft.lora:
        model = apply_lora(model, r=sft.r, lora_alpha=sft.lora_alpha, lora_dropout=sft.lora_dropout,
                           target_modules=sft.target_modules, seed=spec.seed)
    train_set = SFTDataset(train_rows, epoch_order(len(train_rows), run.epochs, seed=spec.seed))
    val_set = SFTDataset(val_rows, np.arange(len(val_rows)))
    collate = SFTCollator(tokenizer.eos_token_id)
    fast = {k: v for k, v in fast_path(spec).items() if k != "compiled"}
    mask_id = getattr(model.config, "mask_token_id", None)  # the model's own (LLaDA-8B: 126,336), else the tokenizer's
    mask_id = tokenizer.mask_token_id if mask_id is None else mask_id
    objective = build_objective(run.arm.objective, seed=spec.seed, **fast, **(
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
    settings = DecodeSettings(ev.steps, ev.gen_length, ev.block_length, ev.batch_size, compiled=ev.compiled)

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
            out["accuracy"] = sum(r["correct"] for r in rows) / len(rows)
            out["answer_f1"] = sum(r["f1"] for r in rows) / len(rows)
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
    final = after_epoch(trained.eval(), samples=run.dir / "eval" / "qa_samples.jsonl")
    finish_tracking(final)
    result = {"run_id": run.run_id, "stage": "sft", "arm": run.arm.name, "objective": run.arm.objective,
              "parent": run.parent, "base": str(run.base), "sft_epochs": run.epochs, "lora": sft.lora,
              "train_rows": len(train_rows), "val_loss_kind": SFT_LOSS_KIND[run.arm.objective],
              "final_val_loss": final["val_loss"], "answer_nll_kind": f"{LOSS_KIND[run.arm.objective]} of answer tokens",
              **{k: v for k, v in final.items() if k.startswith(("accuracy", "answer_"))},
              **train_metrics, "wall_time_s": time.time() - started, "device": device}
    write_json_atomic(run.dir / RESULT_FILE, result)
    return result
