"""Checks across a spec's sections, run when it loads: whatever a run would fail on later, after hours of training,
is found here, every problem at once, one line each naming the key.

Each check reads the validated sections it names and returns its problems; a check whose sections did not
validate is skipped (their own errors are reported instead).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

from dlmstudy.models.registry import ARMS

SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
HOOK = re.compile(r"!function\b")
INCLUDE = re.compile(r"^\s*include\s*:\s*['\"]?([^'\"#\s]+)")


def repeated(values: Iterable[Any]) -> list[Any]:
    """Values that occur more than once, in order of their second occurrence."""
    seen, twice = [], []
    for v in values:
        if v in seen and v not in twice:
            twice.append(v)
        seen.append(v)
    return twice


def _twice(key: str, values: Iterable[Any]) -> list[str]:
    return [f"{key}: {v!r} listed twice" for v in repeated(values)]


def check_arms(arms: list[str]) -> list[str]:
    """Known arm names, each once, and no two names for one (backbone, objective, sampler, overrides) arm."""
    problems = _twice("arms", arms)
    unknown = [a for a in dict.fromkeys(arms) if a not in ARMS]
    problems += [f"arms: unknown arm {a!r}; known arms: {', '.join(sorted(ARMS))}" for a in unknown]
    by_triple: dict[tuple, str] = {}
    for name in dict.fromkeys(a for a in arms if a in ARMS):
        arm = ARMS[name]
        triple = (arm.backbone, arm.objective, arm.sampler, tuple(sorted(arm.overrides.items())))
        if triple in by_triple:
            problems.append(f"arms: {by_triple[triple]!r} and {name!r} are one arm (backbone {arm.backbone}, "
                            f"objective {arm.objective}, sampler {arm.sampler}); list it once")
        by_triple.setdefault(triple, name)
    return problems


def _diffusion(arms: list[str]) -> bool:
    return any(ARMS[a].sampler == "diffusion" for a in arms if a in ARMS)


def check_solved_shape(model, grid) -> list[str]:
    """With grid.params each size's shape is solved, so the spec's shape keys would be ignored: refused."""
    if not grid.params:
        return []
    return [f"model.{k}: not used with grid.params (each size's shape is solved by the aspect rule, "
            f"docs/arms.md); remove one of them" for k in SHAPE_KEYS if k in model.model_fields_set]


def check_model(model, arms: list[str]) -> list[str]:
    """Every arm's shape can be built: heads divide the width, kv heads divide the heads, the head width is even
    (rotary embeddings rotate pairs)."""
    problems: list[str] = []
    for name in dict.fromkeys(a for a in arms if a in ARMS):
        overrides = {k: v for k, v in ARMS[name].overrides.items() if k in type(model).model_fields}
        size = {**model.model_dump(), **overrides}
        d, heads, kv = size["hidden_size"], size["num_heads"], size["num_kv_heads"]
        found = []
        if d % heads:
            found.append(f"model.hidden_size: {d} is not divisible by model.num_heads {heads}")
        elif (d // heads) % 2:
            found.append(f"model.num_heads: head width hidden_size / num_heads = {d // heads} is odd; rotary "
                         "embeddings need an even head width")
        if kv is not None and (kv > heads or heads % kv):
            found.append(f"model.num_kv_heads: {kv} does not divide model.num_heads {heads}")
        problems += [p for p in found if p not in problems]
    return problems


def check_evaluation(evaluation, arms: list[str]) -> list[str]:
    """Diffusion decoding settings that combine: whole blocks (gen_length / block_length), whole steps per block;
    a sampler grid whose every value is used by some setting."""
    problems = []
    diffusion = _diffusion(arms)
    gen, block, steps = evaluation.gen_length, evaluation.block_length, evaluation.steps
    if diffusion and gen % block:
        problems.append(f"evaluation.block_length: evaluation.gen_length {gen} is not divisible by block_length "
                        f"{block} (the diffusion sampler decodes whole blocks)")
    elif diffusion and steps % (gen // block):
        problems.append(f"evaluation.steps: {steps} is not divisible by the number of blocks {gen // block} "
                        f"(gen_length {gen} / block_length {block})")
    grid = evaluation.sampler_grid
    for key in ("steps", "block_length", "threshold", "compiled", "batch_size"):
        problems += _twice(f"evaluation.sampler_grid.{key}", getattr(grid, key))
    if not grid.steps:
        problems += [f"evaluation.sampler_grid.{k}: given without sampler_grid.steps, so never used"
                     for k in ("block_length", "threshold", "compiled", "batch_size") if k in grid.model_fields_set]
        return problems
    needed = ("block_length", "threshold", "compiled") if diffusion else ("compiled",)
    problems += [f"evaluation.sampler_grid.{k}: empty, so no sampler setting is run" for k in needed
                 if not getattr(grid, k)]
    if diffusion and grid.block_length:
        problems += [f"evaluation.sampler_grid.block_length: {b} does not divide evaluation.gen_length {gen}"
                     for b in grid.block_length if gen % b]
        blocks = [gen // b for b in grid.block_length if gen % b == 0]
        problems += [f"evaluation.sampler_grid.steps: {s} is not divisible by the number of blocks of any "
                     f"sampler_grid.block_length ({', '.join(str(n) for n in blocks)})"
                     for s in grid.steps if blocks and all(s % n for n in blocks)]
    return problems


def _points(grid, max_length: int) -> list[tuple[tuple, tuple]]:
    """(as written, what the run is) for every grid point: unique tokens round down to whole sequences and epochs
    to the 6 decimals a run id keeps."""
    from dlmstudy.study.plan import data_settings

    points = []
    for s in data_settings(grid):
        u = s.unique if s.unit == "people" else s.unique // max_length * max_length
        epochs = s.epochs if s.epochs is not None else Fraction(s.total_tokens, max(u, 1))
        points.append(((s.unique, s.epochs), (u, round(float(epochs), 6))))
    return points


def check_grid(grid, data) -> list[str]:
    """Grid values the data can give, and no two grid points that make the same run."""
    problems = _twice("grid.params", grid.params or [])
    if grid.pairing == "product" or grid.epochs is None:  # zip pairs may repeat a value: the pairs are checked below
        for key in ("unique_tokens", "unique_people", "epochs"):
            problems += _twice(f"grid.{key}", getattr(grid, key) or [])
    builtin = data.pretrain.source == "builtin:biographies"
    if grid.unique_people is not None and not builtin:
        problems.append(f"grid.unique_people: counts people of the built-in biographies, but data.pretrain.source is "
                        f"{data.pretrain.source}; give grid.unique_tokens")
    elif grid.unique_people is not None:
        problems += [f"grid.unique_people: {n} exceeds data.pretrain.people ({data.pretrain.people})"
                     for n in grid.unique_people if n > data.pretrain.people]
    L = data.max_length
    problems += [f"grid.unique_tokens: {u} is less than one sequence (data.max_length {L})"
                 for u in grid.unique_tokens or [] if u < L]
    if grid.total_tokens is not None and grid.total_tokens < L:
        problems.append(f"grid.total_tokens: {grid.total_tokens} is less than one sequence (data.max_length {L})")
    if problems:
        return problems
    first: dict[tuple, tuple] = {}
    unit = "unique_tokens" if grid.unique_tokens is not None else "unique_people"
    for written, run in _points(grid, L):
        if unit == "unique_tokens" and round(run[1] * (run[0] // L)) < 1:
            problems.append(f"grid: unique_tokens {written[0]} for {run[1]:g} epochs is less than one sequence "
                            f"(data.max_length {L})")
        if run in first and first[run] != written:
            (u1, _), (u2, _) = first[run], written
            problems.append(f"grid.{unit}: {u1} and {u2} make the same runs ({run[0]} unique tokens: whole "
                            f"sequences of data.max_length {L}); keep one")
        elif run in first and grid.pairing == "zip":
            problems.append(f"grid: the pair unique {written[0]}, epochs {written[1]:g} is listed twice")
        first.setdefault(run, written)
    return problems


def check_data(data) -> list[str]:
    if data.validation_tokens < data.max_length:
        return [f"data.validation_tokens: {data.validation_tokens} is less than one sequence "
                f"(data.max_length {data.max_length})"]
    return []


def check_sft(sft, arms: list[str]) -> list[str]:
    """SFT bases name arms of the study; epoch counts are listed once."""
    if sft is None:
        return []
    problems = _twice("sft.epochs", sft.epochs)
    problems += [f"sft.base.{name}: not an arm of this study (arms: {', '.join(arms)})"
                 for name in sft.base if name not in arms]
    return problems


def check_training(training, device: str) -> list[str]:
    """Settings that override each other, or that the device cannot run."""
    problems = []
    if training.eval_every and "eval_steps" in training.arguments:
        problems.append("training.eval_every and training.eval_steps both set how often validation runs; keep one")
    if device == "cpu" and training.arguments.get("fp16"):
        problems.append("training.fp16: needs a GPU, and device is cpu (bf16 runs on CPU)")
    return problems


def task_hooks(folder: str | Path) -> list[str]:
    """Where the task YAMLs in `folder` (and the files they include) name `!function` hooks: code lm_eval imports
    from the folder without asking. One 'file line N' entry per hook."""
    folder = Path(folder)
    files = sorted(folder.rglob("*.y*ml")) if folder.is_dir() else [folder]
    found, seen = [], set()
    while files:
        path = files.pop(0).resolve()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0]
            if HOOK.search(text):
                found.append(f"{path} line {number}")
            included = INCLUDE.match(text)
            if included:
                files.append(path.parent / included.group(1))
    return found


def check_lm_eval(evaluation) -> list[str]:
    """Task names once each; a task folder with `!function` hooks only with evaluation.lm_eval.allow_code."""
    lm_eval = evaluation.lm_eval
    problems = _twice("evaluation.lm_eval.tasks", lm_eval.tasks)
    if lm_eval.include_path and not lm_eval.allow_code and Path(lm_eval.include_path).exists():
        hooks = task_hooks(lm_eval.include_path)
        if hooks:
            more = f" (and {len(hooks) - 1} more)" if len(hooks) > 1 else ""
            problems.append(f"evaluation.lm_eval.include_path: {hooks[0]}{more} names a !function hook, code that "
                            "lm_eval runs from the task folder; set evaluation.lm_eval.allow_code: true to allow it")
    return problems


def _given(section, keys: Iterable[str]) -> list[str]:
    """The keys among `keys` the spec wrote in `section` (not left at their defaults)."""
    return [k for k in keys if k in section.model_fields_set]


def check_unused(tokenizer, data, grid, training, evaluation, sft, arms: list[str]) -> list[str]:
    """Keys that the rest of the spec makes unused: written, they would be ignored without a word."""
    builtin = data.pretrain.source == "builtin:biographies"
    problems = [f"tokenizer.{k}: not used with tokenizer.kind pretrained (the folder's tokenizer is used)"
                for k in _given(tokenizer, ("vocab_size", "sample_bytes")) if tokenizer.kind == "pretrained"]
    if tokenizer.kind == "bpe" and tokenizer.path:
        problems.append("tokenizer.path: used only with tokenizer.kind: pretrained (kind bpe trains one)")
    problems += [f"data.pretrain.{k}: a setting of the built-in biographies, but data.pretrain.source is "
                 f"{data.pretrain.source}" for k in _given(data.pretrain, ("people", "biographies_per_person",
                                                                          "qa_fraction")) if not builtin]
    if builtin and "text_field" in data.pretrain.model_fields_set:
        problems.append("data.pretrain.text_field: not used with the built-in biographies")
    if not builtin and evaluation.qa_people and "qa_people" in evaluation.model_fields_set:
        problems.append("evaluation.qa_people: QA probes come from the built-in biographies only")
    if grid.total_tokens is not None and "pairing" in grid.model_fields_set:
        problems.append("grid.pairing: pairs unique sizes with grid.epochs; not used with grid.total_tokens")
    if not grid.params and "params_kind" in grid.model_fields_set:
        problems.append("grid.params_kind: not used without grid.params")
    if not training.fast_head and "head_chunk" in training.model_fields_set:
        problems.append("training.head_chunk: a setting of the fast head, and training.fast_head is false")
    if not any(ARMS[a].objective == "mdm" for a in arms if a in ARMS):
        problems += [f"training.{k}: a setting of the diffusion objective, and no arm trains with it"
                     for k in _given(training, ("random_length_ratio", "mask_eps"))]
    if not evaluation.lm_eval.tasks:
        problems += [f"evaluation.lm_eval.{k}: not used without evaluation.lm_eval.tasks"
                     for k in _given(evaluation.lm_eval, ("include_path", "limit", "model_args", "allow_code"))]
    if sft is not None and not sft.lora:
        problems += [f"sft.{k}: a LoRA setting, and sft.lora is false" for k in
                     _given(sft, ("r", "lora_alpha", "lora_dropout", "target_modules"))]
    return problems


def check_comparisons_of(comparisons, arms: list[str]) -> list[str]:
    """`comparisons:` names pairs of `arms:`, one diffusion and one AR arm each, none twice."""
    from dlmstudy.study.comparisons import check_comparisons

    if comparisons is None:
        return []
    try:
        check_comparisons(arms, comparisons)
    except ValueError as err:
        return [f"comparisons: {err}"]
    return []


# (the sections a check reads, the check): run in order when all its sections validated.
CHECKS: list[tuple[tuple[str, ...], Callable[..., list[str]]]] = [
    (("arms",), check_arms),
    (("comparisons", "arms"), check_comparisons_of),
    (("model", "grid"), check_solved_shape),
    (("model", "arms"), check_model),
    (("evaluation", "arms"), check_evaluation),
    (("grid", "data"), check_grid),
    (("data",), check_data),
    (("sft", "arms"), check_sft),
    (("training", "device"), check_training),
    (("evaluation",), check_lm_eval),
    (("tokenizer", "data", "grid", "training", "evaluation", "sft", "arms"), check_unused),
]


def cross_checks(sections: dict[str, Any]) -> list[str]:
    """Every check whose sections are all in `sections` (the ones that validated), problems in order."""
    problems: list[str] = []
    for needs, check in CHECKS:
        if all(name in sections for name in needs):
            problems += check(*(sections[name] for name in needs))
    return problems
