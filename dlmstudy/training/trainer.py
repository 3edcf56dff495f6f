"""The one trainer every arm shares: `transformers.Trainer` with the objective plugged in.

What differs between arms is only the objective (and the attention direction in the model's
config). Batches come in the run's fixed order (no shuffling here: the order was drawn once per
(data seed, U, R) so both arms see the same batches), and validation loss is the exact NLL for AR
arms and the ELBO upper bound for diffusion arms.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import DistributedType
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback

from dlmstudy.damaged import set_aside
from dlmstudy.models.checkpoints import checkpoint_problem
from dlmstudy.training.clipping import clip_in_step, folds_clipping
from dlmstudy.training.heads import uncompile_body

COMPLETE_MARK = "COMPLETE"


def host_index(batch: dict) -> dict:
    """The batch with its "index" as a list of ints, which device placement leaves on the host: the diffusion
    objective seeds its noise from it there, and a device tensor would cost a device sync per step."""
    if "index" in batch:
        batch = {**batch, "index": torch.as_tensor(batch["index"]).reshape(-1).tolist()}
    return batch


class DLMTrainer(Trainer):
    """Trainer whose loss is `objective(model, batch)`; logs tokens seen, tokens/s and objective metrics."""

    loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean: let the Trainer divide by accumulation

    def __init__(self, *args, objective: Callable, tokens_per_step: int,
                 validation_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None, cuda_graphs: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.cuda_graphs = cuda_graphs
        collate = self.data_collator
        self.data_collator = lambda features: host_index(collate(features))
        self.objective = objective
        self.tokens_per_step = tokens_per_step
        self.validation_fn = validation_fn
        self._metric_sums: dict[str, float] = {}
        self._metric_count = 0
        self._last_log = (None, 0)

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def _mark_step(self) -> None:
        """With a CUDA-graphed decoder (`compile_body(..., cuda_graphs=True)`): the last step's graph outputs are
        consumed, so the graphs may overwrite them."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._mark_step()
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The objective under the run's mixed precision: accelerate autocasts only `model.forward`, so a loss
        that runs the output head itself (the fast head) would otherwise do its matmuls in fp32."""
        with self.accelerator.autocast():
            loss, metrics = self.objective(model, inputs)
        if model.training:
            for k, v in metrics.items():
                self._metric_sums[k] = self._metric_sums.get(k, 0.0) + v
            self._metric_count += 1
        return (loss, None) if return_outputs else loss

    def _clip_grad_norm(self, model):
        """Clip inside the fused optimizer's step (clipping.py) where the gradients are whole on this process and
        no GradScaler is in use; elsewhere (FSDP, DeepSpeed, fp16) as the Trainer does. Returns the norm."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper
        whole = self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                      DistributedType.MULTI_CPU)
        if whole and self.accelerator.scaler is None and folds_clipping(optimizer):
            return clip_in_step(optimizer, model.parameters(), self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def final_model(self) -> torch.nn.Module:
        """The trained model without accelerate's mixed-precision wrapper around `forward` and without the
        training compilation (`compile_body`), so what runs next (evaluation, sampling) computes in the model's
        own dtype, eagerly unless its own settings compile, as a reloaded checkpoint does. Under the wrapper an
        AR model's prefill wrote fp32 keys into a static KV cache that compiled decoding then fed bf16 keys
        (seen on the H200)."""
        return uncompile_body(self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False))

    def _save_checkpoint(self, model, trial) -> None:
        """Save as the Trainer does, then wait for every process, so `on_save` (the completion mark) comes last."""
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        step = self.state.global_step
        logs = dict(logs)
        logs["tokens_seen"] = step * self.tokens_per_step
        if "loss" in logs:
            now = time.perf_counter()
            last_time, last_step = self._last_log
            if last_time is not None and step > last_step:
                logs["tokens_per_s"] = (step - last_step) * self.tokens_per_step / (now - last_time)
            self._last_log = (now, step)
            for k, v in self._metric_sums.items():
                logs[k] = float(v) / max(self._metric_count, 1)
            self._metric_sums, self._metric_count = {}, 0
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Validation loss through `validation_fn` (exact NLL for AR, ELBO bound for diffusion)."""
        if self.validation_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        self._mark_step()
        metrics = self.validation_fn(self.model)
        if was_training:
            self.model.train()
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics


class CompleteMarker(TrainerCallback):
    """Marks a checkpoint folder complete once the Trainer has written all of it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / COMPLETE_MARK).touch()


def last_complete_checkpoint(folder: Path, progress: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint with a completion mark whose files are whole; unmarked (partial) checkpoints are
    removed, and a marked one found damaged (a file cut short or unreadable) is set aside into `damaged/` beside
    the folder and reported, so the run resumes from the one before it."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in found if (p / COMPLETE_MARK).exists()]
    for p in found:
        if p not in complete:
            shutil.rmtree(p, ignore_errors=True)
    while complete:
        newest = complete.pop()
        problem = checkpoint_problem(newest)
        if problem is None:
            return newest
        try:
            moved = set_aside(newest, into=folder.parent / "damaged")
        except FileNotFoundError:  # another process of the same run set it aside first
            continue
        progress(f"{newest}: damaged ({problem}); set aside as {moved}, resuming from the checkpoint before it")
    return None
