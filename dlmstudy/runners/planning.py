"""`dlmstudy plan`: a study's runs, missing inputs and estimated cost, without training.

Built on `runners.study` (runs from the spec or the prepared data), `runners.sft` (SFT runs) and
`study.estimate` (time from `dlmstudy bench` records: shipped, a --bench file, or `runners.calibration`'s
measurements on this machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from dlmstudy.models.backbones import SpecialTokens, build_config
from dlmstudy.runners.bench import flops_per_token, matmul_params
from dlmstudy.runners.calibration import training_mode
from dlmstudy.runners.run import default_arguments, optimizer_steps
from dlmstudy.runners.sft import resolve_sft_runs
from dlmstudy.runners.study import MissingInput, Run, missing_inputs, plan_tokens, prepare_data, resolve_runs
from dlmstudy.study.estimate import BenchRecord, Estimate, closest_record
from dlmstudy.study.spec import StudySpec


@dataclass
class StudyPlan:
    """What `dlmstudy plan` shows: the runs (exact ids only when the data were prepared), missing inputs, notes."""

    runs: list[Run]
    sft_runs: list
    missing: list[MissingInput]
    vocabulary: str
    exact_ids: bool


def plan_study(spec: StudySpec) -> StudyPlan:
    """The study's runs from the spec alone where the grid allows (unique tokens); `unique_people` prepares
    the built-in corpus (cheap). Missing inputs are listed, not raised, so a plan works before the downloads."""
    missing = missing_inputs(spec)
    if spec.grid.unique_people is None:
        tokens, vocabulary = plan_tokens(spec)
        runs, exact = resolve_runs(spec, tokens=tokens), False
    elif any(m.key in ("data.pretrain.source", "tokenizer.path") for m in missing):
        return StudyPlan([], [], missing, "grid.unique_people needs the corpus and tokenizer to count tokens", False)
    else:
        data = prepare_data(spec, progress=lambda m: None, check_inputs=False)
        runs, exact, vocabulary = resolve_runs(spec, data), True, f"vocabulary {data.tokens.vocab_size:,} rows"
    return StudyPlan(runs, resolve_sft_runs(spec, runs), missing, vocabulary, exact)


def run_flops(run: Run) -> tuple[int, float]:
    """(matmul weights N, training FLOPs per token) of a run's model, counted on the meta device as bench counts."""
    config = build_config(run.arm.backbone, run.size, SpecialTokens(**run.config["tokens"]), causal=run.arm.causal)
    with torch.device("meta"):
        n = matmul_params(AutoModelForCausalLM.from_config(config))
    return n, flops_per_token(n, run.size.num_layers, run.size.hidden_size, run.config["max_length"])


def validation_tokens(spec: StudySpec, run: Run, arguments: dict) -> int:
    """Token positions a run's validations run forward: every evaluation during training (on `eval_batches`
    batches, or the whole validation set) and the final one on the whole set, times the diffusion draws."""
    L = run.config["max_length"]
    n_val = max(1, spec.data.validation_tokens // L)
    during = min(n_val, spec.training.eval_batches * arguments["per_device_train_batch_size"]) or n_val
    steps = optimizer_steps(arguments, run.total_tokens // L)
    draws = spec.evaluation.mc_num if run.arm.objective == "mdm" else 1
    return (steps // arguments["eval_steps"] * during + n_val) * L * draws


def estimate_runs(spec: StudySpec, runs: list[Run], records: list[BenchRecord], *,
                  device_name: str | None = None, device: str = "cuda") -> list[Estimate]:
    """Each run's tokens, FLOPs and time on one device, timed by the closest bench record of its objective (and
    arm); `device` is the kind the run's training path is chosen for (CUDA graphs only on cuda)."""
    mode = training_mode(spec, device)
    out = []
    for r in runs:
        n, fpt = run_flops(r)
        arguments = default_arguments(r.config, r.total_tokens // r.config["max_length"], "cpu")
        batch = arguments["per_device_train_batch_size"]
        record = closest_record(records, objective=r.arm.objective, flops_per_token=fpt, seq_len=r.config["max_length"],
                                batch=batch, mode=mode, device_name=device_name, arm=r.arm.name)
        out.append(Estimate(r.total_tokens, n, fpt, record, batch, validation_tokens(spec, r, arguments)))
    return out
