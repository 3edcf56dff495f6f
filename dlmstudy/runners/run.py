"""Training and evaluating one run, resumably; `result.json` is written last and atomically.

A run folder holds run.json (the resolved config), checkpoints/ (Trainer checkpoints, each marked
complete only once fully written), scalars.jsonl (every logged scalar), swanlog/ (SwanLab offline
logs), checkpoint/ (the final model), eval/ (probe answers) and result.json.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from dlmstudy.analysis.paired import paired_comparison, reference_setting
from dlmstudy.atomic import write_json_atomic
from dlmstudy.data.biographies import QAItem
from dlmstudy.data.packing import PackedDataset, epoch_order, prefix_chunks
from dlmstudy.errors import UserError
from dlmstudy.evaluation.qa import (
    DecodeSettings,
    accuracy_by_direction,
    answer_questions,
    save_answers,
)
from dlmstudy.evaluation.validation import LOSS_KIND, validation_loss
from dlmstudy.models.backbones import build_config, build_model
from dlmstudy.models.checkpoints import save_checkpoint
from dlmstudy.runners.device import supports_bf16
from dlmstudy.runners.launch import process_rank
from dlmstudy.runners.study import Run, StudyData, fast_path
from dlmstudy.study.spec import StudySpec
from dlmstudy.training.clock import TrainClock
from dlmstudy.training.heads import compile_body
from dlmstudy.training.registry import build_objective
from dlmstudy.training.tracking import (
    QuietProgress,
    ScalarMirror,
    finish_tracking,
    read_scalars,
    start_swanlab,
)
from dlmstudy.training.trainer import (
    CompleteMarker,
    DLMTrainer,
    last_complete_checkpoint,
)

RESULT_FILE = "result.json"


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a run with a checkpoint: SIGTERM, SIGINT and SIGUSR2 (what Slurm sends before a time
    limit when asked with --signal, and submitit's preemption signal). Inside a submitit Slurm job SIGTERM is left
    to submitit, which ignores it there: preemptions and time limits arrive as SIGUSR2."""
    on_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    return (signal.SIGINT, signal.SIGUSR2) if on_slurm else (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class StopOnSignal(TrainerCallback):
    """On a stop signal (`stop_signals`): save a checkpoint at the end of the current step and stop training.

    `uninstall` puts back the handlers that were there before (a job runner's own, for instance)."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._handler) for sig in stop_signals()}

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; the run resumes next time."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


def optimizer_steps(arguments: dict, n_samples: int) -> int:
    """Optimizer steps of a run over `n_samples` sequences (one pass: epochs are in its order), or `max_steps`."""
    if arguments.get("max_steps", -1) > 0:
        return arguments["max_steps"]
    return math.ceil(n_samples / arguments["per_device_train_batch_size"] / arguments["gradient_accumulation_steps"])


def default_arguments(config: dict, n_samples: int, device: str, *, evals: int = 8) -> dict:
    """TrainingArguments defaults for a run; the spec's `training:` keys override them."""
    args = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
            "lr_scheduler_type": "cosine", "warmup_steps": 0.05, "weight_decay": 0.0,
            "max_grad_norm": 1.0, "save_total_limit": 2,
            "logging_nan_inf_filter": False}  # log a non-finite loss as it is, and skip a per-step device sync
    args.update(config["training"])
    steps = optimizer_steps(args, n_samples)
    args.setdefault("logging_steps", max(1, steps // 50))
    every = config.get("objective_settings", {}).get("eval_every") or max(1, steps // evals)
    args.setdefault("eval_steps", every)
    args.setdefault("save_steps", max(1, steps // 4))
    args.update(eval_strategy="steps", save_strategy="steps", report_to="none", seed=config["seed"],
                remove_unused_columns=False, dataloader_num_workers=0, num_train_epochs=1,
                use_cpu=device == "cpu", disable_tqdm=False)
    if device == "cuda":  # batches move to the GPU asynchronously from pinned memory: no device sync per step
        args.setdefault("accelerator_config", {"non_blocking": True})
    if device != "cpu" and "bf16" not in config["training"]:
        args["bf16"] = supports_bf16(device)
    if device == "npu" and "optim" not in config["training"]:
        args["optim"] = "adamw_torch"  # torch's fused AdamW is CUDA/CPU only; untested on real NPUs
    return args


def fit(model, *, run_id: str, run_dir: Path, arguments: dict, train_set, eval_set, objective, tokens_per_step: int,
        validation_fn, spec: StudySpec, config: dict, data_collator=None, cuda_graphs: bool = False, progress=print):
    """The training loop every stage shares: DLMTrainer + tracking + complete-marked checkpoints + resume + SIGTERM.

    Returns (trained model, metrics; time and tokens/s over every segment of a resumed run), the run's SwanLab
    experiment still open for the final evaluation (the caller closes it with `finish_tracking`). Raises
    Interrupted after saving when a signal asked it to stop.
    """
    tracker = (start_swanlab(spec.tracking, name=run_id, logdir=run_dir / "swanlog", config=config)
               if process_rank() == 0 else None)
    # transformers' SwanLabCallback logs into the run opened here; it stays open for the final evaluation
    args = TrainingArguments(output_dir=str(run_dir / "checkpoints"),
                             **{**arguments, "report_to": ["swanlab"] if tracker is not None else "none"})
    stopper = StopOnSignal()
    resume = last_complete_checkpoint(run_dir / "checkpoints", progress)
    if resume:
        progress(f"{run_id}: resuming from {resume.name}")
    clock = TrainClock(resume)
    trainer = DLMTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                         objective=objective, tokens_per_step=tokens_per_step, validation_fn=validation_fn,
                         data_collator=data_collator, cuda_graphs=cuda_graphs,
                         callbacks=[ScalarMirror(run_dir / "scalars.jsonl"), clock, CompleteMarker(), stopper])
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    stopper.install()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException as err:
        finish_tracking(error=f"{type(err).__name__}: {err}")
        raise
    finally:
        stopper.uninstall()
    if stopper.requested:
        finish_tracking(error="stopped on a signal; resumes next time")
        raise Interrupted(f"{run_id}: stopped on a signal at step {trainer.state.global_step}; run again to resume",
                          stopper.signum)
    runtime = clock.before + out.metrics.get("train_runtime", float("nan"))  # this segment and those before it
    trained = trainer.state.global_step * tokens_per_step
    return trainer.final_model(), {"train_runtime_s": runtime, "train_segments": clock.segments,
                                   "train_tokens_per_s": trained / runtime if runtime else None,
                                   "steps": trainer.state.global_step, "tokens_per_step": tokens_per_step}


def train_run(run: Run, spec: StudySpec, data: StudyData, device: str, progress=print):
    """Pretrain (or resume) a run on its U-token prefix for R epochs; returns (model, training metrics)."""
    L = run.config["max_length"]
    chunks = prefix_chunks(data.train, run.unique_tokens, L)
    order = epoch_order(len(chunks), run.epochs, seed=spec.data.seed)
    train_set = PackedDataset(chunks, order)
    val_ids = torch.from_numpy(data.validation.astype("int64"))
    val_set = PackedDataset(data.validation, torch.arange(len(data.validation)).numpy())
    model = build_model(build_config(run.arm.backbone, run.size, data.tokens, causal=run.arm.causal), seed=spec.seed)
    ts = spec.training
    fast = fast_path(spec)
    graphs = ts.cuda_graphs and device == "cuda"
    if ts.cuda_graphs and not graphs:
        progress(f"{run.run_id}: training.cuda_graphs is for CUDA; compiling without graphs on {device}")
    if fast.get("compiled"):
        compile_body(model, cuda_graphs=graphs)
    objective = build_objective(run.arm.objective, seed=spec.seed, **fast, **(
        {"mask_id": data.tokens.mask_token_id, "eps": ts.mask_eps, "random_length_ratio": ts.random_length_ratio}
        if run.arm.objective == "mdm" else {}))
    arguments = default_arguments(run.config, len(train_set), device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = arguments["per_device_train_batch_size"] * arguments["gradient_accumulation_steps"] * world * L
    ev = spec.evaluation
    n_val = min(len(val_ids), ts.eval_batches * arguments["per_device_train_batch_size"]) or len(val_ids)

    def during_training(m):
        return validation_loss(m, run.arm.objective, val_ids[:n_val], mask_id=data.tokens.mask_token_id,
                               mc_num=ev.mc_num, batch_size=ev.batch_size, seed=spec.seed)

    return fit(model, run_id=run.run_id, run_dir=run.dir, arguments=arguments, train_set=train_set, eval_set=val_set,
               objective=objective, tokens_per_step=tokens_per_step, validation_fn=during_training, spec=spec,
               config=run.config, cuda_graphs=graphs, progress=progress)


def evaluate_run(model, run: Run, spec: StudySpec, data: StudyData, probes: list[QAItem], device: str) -> dict:
    """Final validation loss on every validation sequence and QA accuracy per direction.

    The loss is computed with the trained (fp32) weights. The probes then decode as the model is served: with
    bf16 weights where the run trained in bf16, as `dlmstudy bench` samples, so the sampler grid's speeds are
    the deployed ones. The model is cast in place: its checkpoint is already saved."""
    ev = spec.evaluation
    model.eval()
    val = validation_loss(model, run.arm.objective, torch.from_numpy(data.validation.astype("int64")),
                          mask_id=data.tokens.mask_token_id, mc_num=ev.mc_num, batch_size=ev.batch_size, seed=spec.seed)
    if run.config["training"].get("bf16", device != "cpu" and supports_bf16(device)):
        model.to(torch.bfloat16)
    rows = answer_questions(model, data.tokenizer, probes, sampler=run.arm.sampler,
                            settings=DecodeSettings(ev.steps, ev.gen_length, ev.block_length, ev.batch_size,
                                                     compiled=ev.compiled)) if probes else []
    save_answers(rows, run.dir / "eval" / "qa_samples.jsonl")
    acc = {k: (None if v != v else v) for k, v in accuracy_by_direction(rows).items()}
    metrics = {"final_val_loss": val["val_loss"], "final_val_loss_stderr": val["val_loss_stderr"],
               "accuracy_forward": acc["forward"], "accuracy_reverse": acc["reverse"], "n_probes": len(rows),
               "probe_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if probes and ev.sampler_grid.steps:
        grid = sampler_grid(model, data.tokenizer, probes, ev, sampler=run.arm.sampler)
        grid.to_csv(run.dir / "eval" / "sampler_grid.csv", index=False)
    if ev.lm_eval.tasks:
        metrics["lm_eval"] = lm_eval_run(run, spec, data, probes, device)
    return metrics


def sampler_grid(model, tokenizer, probes: list[QAItem], ev, sampler: str = "diffusion") -> pd.DataFrame:
    """Accuracy and generated tokens/s on the probes for each sampler setting: every valid (steps, block_length,
    threshold, compiled) for diffusion; AR decoding (one token per step) eager and compiled; each at every grid
    batch size. Every setting runs once untimed first (compiled ones compile per shape; eager ones start warm too).

    Each row is also compared probe by probe with the plain sampler at its batch size (`reference_setting`): the
    share of answers identical to its answers, and the paired standard error of the accuracy difference, which is
    what "equal accuracy" is judged against (far smaller than the two accuracies' own errors when most answers
    agree)."""
    g = ev.sampler_grid
    if sampler == "diffusion":
        grid = [(steps, block, threshold, compiled) for steps, block, threshold, compiled
                in itertools.product(g.steps, g.block_length, g.threshold, g.compiled)
                if ev.gen_length % block == 0 and steps % (ev.gen_length // block) == 0]
    else:
        grid = [(ev.gen_length, 1, None, compiled) for compiled in g.compiled]
    rows = []
    for batch_size in (g.batch_size or [ev.batch_size]) if grid else []:
        group, answers_by_setting = [], []
        for steps, block, threshold, compiled in grid:
            settings = DecodeSettings(steps, ev.gen_length, block, batch_size, threshold, compiled)
            answer_questions(model, tokenizer, probes, sampler=sampler, settings=settings)  # untimed: warm-up
            start = time.perf_counter()
            answers = answer_questions(model, tokenizer, probes, sampler=sampler, settings=settings)
            seconds = time.perf_counter() - start
            acc = accuracy_by_direction(answers)
            answers_by_setting.append(answers)
            group.append({"steps": steps, "block_length": block, "threshold": threshold, "compiled": compiled,
                          "batch_size": batch_size, "accuracy": sum(a["correct"] for a in answers) / len(answers),
                          "accuracy_forward": acc["forward"], "accuracy_reverse": acc["reverse"],
                          "tokens_per_s": len(answers) * ev.gen_length / seconds})
        reference = answers_by_setting[reference_setting(grid)]
        for row, answers in zip(group, answers_by_setting):
            row.update(paired_comparison(answers, reference))
        rows += group
    return pd.DataFrame(rows)


def lm_eval_run(run: Run, spec: StudySpec, data: StudyData, probes: list[QAItem], device: str) -> dict:
    """lm_eval on the run's final checkpoint; the built-in bio tasks are written for the probe people."""
    from dlmstudy.data.biographies import generate_people
    from dlmstudy.evaluation.harness import run_eval
    from dlmstudy.evaluation.lm_eval_models import for_sampler, parse_model_args
    from dlmstudy.evaluation.tasks import write_tasks

    ev = spec.evaluation
    include = ev.lm_eval.include_path
    if include is None and any(t.startswith("bio") for t in ev.lm_eval.tasks):
        if not probes:
            raise UserError("the bio_* lm_eval tasks need the built-in biographies (data.pretrain.source: "
                            "builtin:biographies); give other tasks or evaluation.lm_eval.include_path")
        names = {q.person for q in probes}
        people = [p for p in generate_people(spec.data.pretrain.people, seed=spec.data.seed) if p.name in names]
        include = write_tasks(run.dir.parent / "_cache" / "lm_eval_tasks", people,
                              ppl_documents=data.corpus.validation_docs[:50], max_gen_toks=ev.gen_length, seed=spec.seed)
    model_args = for_sampler(f"steps={ev.steps},gen_length={ev.gen_length},block_length={ev.block_length},"
                             f"mc_num={ev.mc_num},batch_size={ev.batch_size}", run.arm.sampler)
    model_args.update(parse_model_args(for_sampler(ev.lm_eval.model_args, run.arm.sampler)))  # the spec's win
    results = run_eval(run.dir / "checkpoint", ev.lm_eval.tasks, include_path=include, model_args=model_args,
                       output_path=run.dir / "eval" / "lm_eval", log_samples=True, limit=ev.lm_eval.limit,
                       device=device, allow_code=ev.lm_eval.allow_code)
    return {task: {k: v for k, v in m.items() if isinstance(v, (int, float))}
            for task, m in (results or {}).get("results", {}).items()}


def execute_run(run: Run, spec: StudySpec, data: StudyData, device: str, probes: list[QAItem], progress=print,
                *, write: bool = True) -> dict | None:
    """Train, evaluate and record one run; the final checkpoint replaces the intermediate ones.

    With `write=False` (ranks other than 0 of a multi-process run) it only trains and returns None.
    """
    started = time.time()
    if write:
        run.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.dir / "run.json", {"run_id": run.run_id, **run.config})
    model, train_metrics = train_run(run, spec, data, device, progress)
    if not write:
        return None
    final = run.dir / "checkpoint"
    tmp = run.dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, data.tokenizer, run.arm)
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    metrics = evaluate_run(model, run, spec, data, probes, device)
    scalars = read_scalars(run.dir)
    val_curve = [v for v in [r["val_loss"] for r in scalars if "val_loss" in r] + [metrics["final_val_loss"]]
                 if math.isfinite(v)]
    finish_tracking({**metrics, "best_val_loss": min(val_curve, default=float("nan"))})
    diverged = not math.isfinite(metrics["final_val_loss"])
    if diverged:
        progress(f"{run.run_id}: DIVERGED (non-finite validation loss); the report lists it and leaves it out of fits")
    result = {"run_id": run.run_id, "arm": run.arm.name, "backbone": run.arm.backbone, "diverged": diverged,
              "objective": run.arm.objective, "sampler": run.arm.sampler,
              "params_total": run.params.total, "params_non_embedding": run.params.non_embedding,
              "params_embedding": run.params.embedding, "params_output_head": run.params.output_head,
              "unique_tokens": run.unique_tokens, "unique_people": run.config["unique_people"],
              "epochs": run.epochs, "tokens": run.total_tokens, "val_loss_kind": LOSS_KIND[run.arm.objective],
              "best_val_loss": min(val_curve, default=float("nan")), **metrics, **train_metrics,
              "wall_time_s": time.time() - started, "device": device}
    write_json_atomic(run.dir / RESULT_FILE, result)
    shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)
    return result
