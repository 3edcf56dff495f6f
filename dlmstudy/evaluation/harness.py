"""`dlmstudy eval`: lm_eval on a checkpoint (or a finished run), results written to disk.

Online when the user is: hub tasks (cmmlu, gsm8k, ...) download their datasets; offline when asked,
or when there is no network (evaluation/hub.py), they must be in the local cache.
Output layout under output_path: `results.json` (lm_eval's results without samples, plus a
`dlmstudy` entry: checkpoint, arm, model_args, and whether likelihoods are exact or ELBO bounds)
and, with log_samples, one `samples_<task>.jsonl` per task. Works under `accelerate launch`: every process
evaluates its share of the requests, rank 0 gathers, writes the files and returns the results.
"""

from __future__ import annotations

import functools
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from dlmstudy.atomic import write_text_atomic
from dlmstudy.errors import UserError
from dlmstudy.evaluation import tasks as bio
from dlmstudy.evaluation.hub import offline as hub_offline
from dlmstudy.evaluation.lm_eval_models import (
    AR_NAMES,
    DIFFUSION_NAMES,
    load_lm,
    parse_model_args,
    resolve_checkpoint,
    split_model_args,
)
from dlmstudy.models.checkpoints import check_whole, read_arm
from dlmstudy.study.checks import task_hooks

HF_NAMES = ("hf",)  # lm_eval's own HF model: an AR checkpoint is evaluated the same way, through HFLM
MODEL_NAMES = ("dlmstudy", *DIFFUSION_NAMES, *AR_NAMES, *HF_NAMES)


def check_model_name(model: str | None, path: Path) -> None:
    """`--model` as lm_eval takes it, checked against the checkpoint's arm (dlmstudy: any arm)."""
    if model is None or model == "dlmstudy":
        return
    if model not in MODEL_NAMES:
        raise UserError(f"--model {model}: use one of {', '.join(MODEL_NAMES)} (the checkpoint's arm decides with "
                        "dlmstudy)")
    arm = read_arm(path)
    sampler, kind = ("diffusion", "diffusion") if model in DIFFUSION_NAMES else ("ar", "AR")
    if arm.sampler != sampler:
        raise UserError(f"--model {model} evaluates {kind} checkpoints, but {path} is arm {arm.name} "
                        f"({arm.sampler} sampler); use --model dlmstudy")


@functools.lru_cache(maxsize=8)
def _indexed(include_path: str | None, include_defaults: bool):
    """A TaskManager per (include_path, defaults): lm_eval's bundled index takes ~10 s to build, so build it once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(names: list[str], include_path: str | Path | None):
    """A TaskManager that knows `names`: the built-in bio tasks, include_path, then lm_eval's own tasks.

    lm_eval's bundled index is only read when a name is not found locally.
    """
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"include_path is not a folder: {include_path}")
    builtin = set(bio.TASKS) | {bio.TAG}
    if include_path is None and builtin & set(names):
        include_path = bio.builtin_tasks_dir()
    local = str(Path(include_path).resolve()) if include_path is not None else None

    def missing(tm) -> list[str]:
        return [n for n in names if n not in tm.all_tasks and not Path(n).is_file()]

    tm = _indexed(local, False) if local else None
    if tm is None or missing(tm):
        tm = _indexed(local, True)
    unknown = missing(tm)
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}: not a built-in task ({', '.join(bio.TASKS)}, tag {bio.TAG}), "
                        f"not in include_path, and not an lm_eval task")
    return tm


def refuse_task_code(folders: list[str | Path], names: list[str]) -> None:
    """A UserError naming the first `!function` hook in the task folders (or in tasks given as YAML files)."""
    for source in [*folders, *(n for n in names if Path(n).is_file())]:
        hooks = task_hooks(source)
        if hooks:
            more = f" (and {len(hooks) - 1} more)" if len(hooks) > 1 else ""
            raise UserError(f"{hooks[0]}{more}: a !function hook, code lm_eval would import from the task folder; "
                            "pass --allow_code to run it")


def write_outputs(results: dict[str, Any], output_path: str | Path) -> Path:
    """results.json (samples left out) and samples_<task>.jsonl under output_path; returns the folder."""
    from lm_eval.utils import handle_non_serializable

    out = Path(output_path)
    out.mkdir(parents=True, exist_ok=True)
    samples = results.get("samples") or {}
    for task, rows in samples.items():
        write_text_atomic(out / f"samples_{task}.jsonl",
                      "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows))
    summary = {k: v for k, v in results.items() if k != "samples"}
    write_text_atomic(out / "results.json", json.dumps(summary, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return out


def _hub_error(exc: BaseException) -> str | None:
    """The first line of a network error behind an lm_eval exception (a dataset not cached), else None."""
    from datasets.exceptions import DatasetNotFoundError

    while exc is not None:
        if isinstance(exc, (ConnectionError, DatasetNotFoundError)):
            return str(exc).splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return None


def _merge_batch(args: dict[str, Any], batch_size: int | str | None, max_batch_size: int | None) -> dict[str, Any]:
    """model_args with --batch_size / --max_batch_size added; the same setting given twice must agree. A
    max_batch_size with no batch size anywhere means `batch_size=auto`: the largest, up to it."""
    if max_batch_size is not None and batch_size is None and "batch_size" not in args:
        batch_size = "auto"
    for key, value in (("batch_size", batch_size), ("max_batch_size", max_batch_size)):
        if value is None:
            continue
        if key in args and str(args[key]) != str(value):
            raise UserError(f"--{key} {value} and model_args {key}={args[key]} disagree")
        args[key] = value
    return args


def run_eval(
    checkpoint: str | Path | None,
    tasks: str | list[str],
    *,
    model: str | None = None,
    include_path: str | Path | None = None,
    model_args: str | dict[str, Any] = "",
    output_path: str | Path | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    gen_kwargs: str | dict[str, Any] | None = None,
    batch_size: int | str | None = None,
    max_batch_size: int | None = None,
    device: str = "cpu",
    allow_code: bool = False,
    offline: str | None = "offline",
) -> dict[str, Any] | None:
    """Evaluate a checkpoint or finished run on lm_eval tasks; the results dict (None on ranks > 0).

    The checkpoint may also come as `pretrained=PATH` in model_args (the tutorial's form); `model` is
    lm_eval's model name, checked against the checkpoint's arm. `offline` says why the Hub is off
    (None: online). Built-in task names (bio_qa_forward, bio_qa_reverse, bio_mc, bio_ppl, tag bio) need
    no include_path; hub tasks (cmmlu, gsm8k, ...) download their datasets online and need them in the
    local cache offline. num_fewshot, gen_kwargs, limit, batch_size and max_batch_size mean what they
    mean in lm_eval's CLI.
    Task YAMLs from include_path (or given as files) with `!function` hooks, code lm_eval imports from
    their folder, are refused unless `allow_code`.
    """
    import lm_eval

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise UserError("no tasks given")
    raw = _merge_batch(split_model_args(model_args), batch_size, max_batch_size)
    pretrained = parse_model_args(raw).get("pretrained")
    raw = {k: v for k, v in raw.items() if k != "pretrained"}
    if checkpoint is None and pretrained is None:
        raise UserError("no checkpoint: pass a checkpoint or run folder, or pretrained=PATH in model_args")
    path = resolve_checkpoint(checkpoint if checkpoint is not None else pretrained)
    if checkpoint is not None and pretrained is not None and resolve_checkpoint(pretrained).resolve() != path.resolve():
        raise UserError(f"checkpoint {checkpoint} and model_args pretrained={pretrained} disagree")
    check_whole(path)
    if not allow_code:
        refuse_task_code([include_path] if include_path is not None else [], names)
    check_model_name(model, path)
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num_fewshot must be >= 0, got {num_fewshot}")
    tm = task_manager(names, include_path)
    lm = load_lm(path, raw, device=device)
    if apply_chat_template and not lm.tokenizer.chat_template:
        raise UserError(f"{path}: the tokenizer has no chat template, so apply_chat_template cannot be used")
    with hub_offline() if offline else nullcontext():
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit,
                                              num_fewshot=num_fewshot, gen_kwargs=gen_kwargs or None,
                                              log_samples=log_samples, apply_chat_template=apply_chat_template)
        except Exception as exc:
            reason = _hub_error(exc)
            if reason is None:
                raise
            if offline:
                raise UserError(f"{reason}: the dataset is not in the local cache and evaluation runs offline "
                                f"({offline}); download it once online, or use a local task in include_path") from None
            raise UserError(f"{reason}: the dataset could not be loaded from the Hub") from None
    if results is None:
        return None
    arm = read_arm(path)
    results["dlmstudy"] = {
        "checkpoint": str(path.resolve()), "arm": arm.name, "sampler": arm.sampler,
        "model_args": parse_model_args(raw), "hub": f"offline ({offline})" if offline else "online",
        # lm_eval's log-likelihoods (and perplexities) of a diffusion arm are Monte-Carlo ELBO bounds
        "likelihood": "mc_elbo_lower_bound" if arm.sampler == "diffusion" else "exact",
    }
    if output_path is not None:
        write_outputs(results, output_path)
    return results
