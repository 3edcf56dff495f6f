"""`dlmstudy eval`: lm_eval on a checkpoint (or a finished run), offline, results written to disk.

Output layout under output_path: `results.json` (lm_eval's results without samples, plus a
`dlmstudy` entry: checkpoint, arm, model_args, and whether likelihoods are exact or ELBO bounds)
and, with log_samples, one `samples_<task>.jsonl` per task. Works under `accelerate launch`: every process
evaluates its share of the requests, rank 0 gathers, writes the files and returns the results.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dlmstudy.atomic import write_text_atomic
from dlmstudy.errors import UserError
from dlmstudy.evaluation import tasks as bio
from dlmstudy.evaluation.lm_eval_models import load_lm, parse_model_args
from dlmstudy.models.checkpoints import META_FILE, check_whole, read_arm
from dlmstudy.study.checks import task_hooks

OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or `<run>/checkpoint` of a finished run folder (one with result.json)."""
    path = Path(path)
    if (path / META_FILE).exists():
        return path
    if (path / "result.json").exists():
        if not (path / "checkpoint" / META_FILE).exists():
            raise UserError(f"{path}: finished run without a checkpoint/ folder")
        return path / "checkpoint"
    if (path / "run.json").exists():
        raise UserError(f"{path}: run is not finished (no result.json), so it has no final checkpoint")
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    raise UserError(f"{path}: neither a dlmstudy checkpoint (no {META_FILE}) nor a finished run folder (no result.json)")


@contextmanager
def offline() -> Iterator[None]:
    """Hub access off for the duration (env vars, and the flags datasets / huggingface_hub read at import)."""
    import datasets.config
    import huggingface_hub.constants as hub

    env = {k: os.environ.get(k) for k in OFFLINE_VARS}
    flags = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE)
    os.environ.update(dict.fromkeys(OFFLINE_VARS, "1"))
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = flags


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


def run_eval(
    checkpoint: str | Path | None,
    tasks: str | list[str],
    *,
    include_path: str | Path | None = None,
    model_args: str | dict[str, Any] = "",
    output_path: str | Path | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    limit: int | float | None = None,
    device: str = "cpu",
    allow_code: bool = False,
) -> dict[str, Any] | None:
    """Evaluate a checkpoint or finished run on lm_eval tasks, offline; the results dict (None on ranks > 0).

    The checkpoint may also come as `pretrained=PATH` in model_args (the tutorial's form).
    Built-in task names (bio_qa_forward, bio_qa_reverse, bio_mc, bio_ppl, tag bio) need no
    include_path; hub tasks (cmmlu, gsm8k, ...) work when their datasets are in the local cache.
    Task YAMLs from include_path (or given as files) with `!function` hooks, code lm_eval imports from
    their folder, are refused unless `allow_code`.
    """
    import lm_eval

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise UserError("no tasks given")
    args = parse_model_args(model_args)
    pretrained = args.pop("pretrained", None)
    if checkpoint is None and pretrained is None:
        raise UserError("no checkpoint: pass a checkpoint or run folder, or pretrained=PATH in model_args")
    path = resolve_checkpoint(checkpoint if checkpoint is not None else pretrained)
    if checkpoint is not None and pretrained is not None and resolve_checkpoint(pretrained).resolve() != path.resolve():
        raise UserError(f"checkpoint {checkpoint} and model_args pretrained={pretrained} disagree")
    check_whole(path)
    if not allow_code:
        refuse_task_code([include_path] if include_path is not None else [], names)
    tm = task_manager(names, include_path)
    lm = load_lm(path, args, device=device)
    if apply_chat_template and not lm.tokenizer.chat_template:
        raise UserError(f"{path}: the tokenizer has no chat template, so apply_chat_template cannot be used")
    with offline():
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit,
                                              log_samples=log_samples, apply_chat_template=apply_chat_template)
        except Exception as exc:
            reason = _hub_error(exc)
            if reason is None:
                raise
            raise UserError(f"{reason}: the dataset is not in the local cache and evaluation runs offline "
                            f"(download it once online, or use a local task in include_path)") from None
    if results is None:
        return None
    arm = read_arm(path)
    results["dlmstudy"] = {
        "checkpoint": str(path.resolve()), "arm": arm.name, "sampler": arm.sampler, "model_args": args,
        # lm_eval's log-likelihoods (and perplexities) of a diffusion arm are Monte-Carlo ELBO bounds
        "likelihood": "mc_elbo_lower_bound" if arm.sampler == "diffusion" else "exact",
    }
    if output_path is not None:
        write_outputs(results, output_path)
    return results
