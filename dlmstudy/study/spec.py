"""The study spec: one YAML file, validated strictly when it loads (every problem at once, one line each
naming the key and the file).

`training:` is passed to `transformers.TrainingArguments` where the name exists there; the few
keys that are ours (sequence length, LLaDA's random-length ratio, ...) live in `TrainingSpec`.
Loading goes: the YAML read as untrusted input (`yaml_file`), the tutorial's names mapped (`names`),
`training:` / `sft:` split and checked against TrainingArguments (`training_args`), each section
validated on its own, checks across sections (`checks`), then the study folder (`check_study_folder`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError,
                      ValidationInfo, create_model, field_validator, model_validator)

from dlmstudy.errors import UserError
from dlmstudy.study.comparisons import check_comparisons


class Strict(BaseModel):
    """Base for every spec section: unknown keys are errors, and so are NaN and infinite numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TrackingSpec(Strict):
    """Where metrics go. SwanLab runs offline unless `mode: online` (or `cloud`; after `swanlab login`); project and
    mode left unset here come from SWANLAB_PROJECT and SWANLAB_MODE (training/tracking.py)."""

    report_to: Literal["swanlab", "none"] = "swanlab"
    project: str = "dlmstudy"
    mode: Literal["offline", "online", "cloud", "local", "disabled"] = "offline"


class TokenizerSpec(Strict):
    """A byte-level BPE trained on the study's pretraining text (`bpe`), or a local HF tokenizer folder."""

    kind: Literal["bpe", "pretrained"] = "bpe"
    vocab_size: int = Field(1024, ge=300)
    path: str | None = None
    sample_bytes: int = Field(32 << 20, ge=1 << 16, description="BPE: train on the first this many bytes of text")

    @model_validator(mode="after")
    def _path_for_pretrained(self) -> "TokenizerSpec":
        if self.kind == "pretrained" and not self.path:
            raise ValueError("tokenizer.kind 'pretrained' needs tokenizer.path (a local tokenizer folder)")
        return self


class SourceSpec(Strict):
    """A corpus: `builtin:biographies` (generated, no files) or a local path (jsonl/json/parquet/txt/...)."""

    source: str = "builtin:biographies"
    text_field: str = "text"
    people: int = Field(2000, ge=10, le=2150, description="builtin: people generated (the pool all prefixes draw "
                        "from; at most 2,150 so that 10% more validation people still have unique names)")
    biographies_per_person: int = Field(1, ge=1)
    qa_fraction: float = Field(0.5, ge=0.0, le=1.0, description="builtin: share of people whose QA pairs are in pretraining")


class DataSpec(Strict):
    """Pretraining corpus, held-out validation size and sequence packing."""

    pretrain: SourceSpec = SourceSpec()
    validation_tokens: int = Field(16384, ge=1)
    max_length: int = Field(128, ge=8)
    drop_tail: bool = True
    insert_eos: bool = True
    num_proc: int = Field(1, ge=1, description="worker processes for tokenization")
    seed: int = 0

    @field_validator("drop_tail")
    @classmethod
    def _full_sequences(cls, v: bool) -> bool:
        if not v:
            raise ValueError("drop_tail: false is not supported for pretraining (the objectives assume full sequences)")
        return v


class ModelSpec(Strict):
    """Size settings shared by every arm (or a parameter target solved per arm by `grid.params`)."""

    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt | None = None
    intermediate_size: PositiveInt | None = None
    max_position_embeddings: PositiveInt = 2048
    rope_theta: PositiveFloat = 10000.0
    rms_norm_eps: PositiveFloat = 1e-5
    tie_word_embeddings: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    match_tolerance: float = Field(0.02, ge=0.0, description="largest relative non-embedding difference between arms")


class GridSpec(Strict):
    """The data settings: unique tokens (or people, for the built-in data) x epochs."""

    unique_tokens: list[PositiveInt] | None = Field(None, min_length=1)
    unique_people: list[PositiveInt] | None = Field(None, min_length=1)
    epochs: list[PositiveFloat] | None = Field(None, min_length=1)
    total_tokens: PositiveInt | None = Field(None, description="fix total tokens and derive epochs = total / unique")
    pairing: Literal["zip", "product"] = "product"
    params: list[PositiveInt] | None = Field(None, min_length=1, description="parameter targets solved per arm by "
                                             "the aspect rule (docs/arms.md); without it every run uses `model:`")
    params_kind: Literal["non_embedding", "total"] = "non_embedding"

    @model_validator(mode="after")
    def _check(self) -> "GridSpec":
        if (self.unique_tokens is None) == (self.unique_people is None):
            raise ValueError("grid needs exactly one of unique_tokens or unique_people")
        if (self.epochs is None) == (self.total_tokens is None):
            raise ValueError("grid needs exactly one of epochs or total_tokens")
        sizes = self.unique_tokens or self.unique_people or []
        if self.pairing == "zip" and self.epochs is not None and len(self.epochs) != len(sizes):
            raise ValueError(f"grid.pairing zip needs as many epochs ({len(self.epochs)}) as unique sizes ({len(sizes)})")
        return self


class TrainingSpec(Strict):
    """Our own training keys; everything else in `training:` goes to TrainingArguments."""

    random_length_ratio: float = Field(0.01, ge=0.0, le=1.0, description="LLaDA: share of batches cut to a random length")
    mask_eps: float = Field(1e-3, gt=0.0, lt=1.0)
    eval_every: int = Field(0, ge=0, description="validation loss every N optimizer steps (0: ~8 times per run)")
    eval_batches: int = Field(0, ge=0, description="validation during training on this many batches; 0: the whole "
                              "validation set, the same sequences as the final evaluation (so best and final compare)")
    fast_head: bool = Field(True, description="exact fast path: output head only where a loss is taken, chunked "
                            "linear+cross-entropy (docs/performance.md): the plain path's losses within bf16 noise, "
                            "3-4x less memory, at least as fast in every bench; false: the plain head")
    head_chunk: int = Field(2048, ge=0)
    compile: bool = Field(False, description="torch.compile the decoder for training, one graph for the whole decoder "
                          "(with the fast head; off CUDA also the head's chunk step, which CUDA runs as a Triton "
                          "kernel); costs compile time per run; evaluation after training runs eagerly")
    cuda_graphs: bool = Field(False, description="with compile, on CUDA: replay the compiled decoder as CUDA graphs "
                              "(compile mode reduce-overhead), so the host launches less per step")
    arguments: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _speed_switches(self) -> "TrainingSpec":
        if self.compile and not self.fast_head:
            raise ValueError("training.compile needs the fast head (training.fast_head: true)")
        if self.cuda_graphs and not self.compile:
            raise ValueError("training.cuda_graphs needs training.compile: true (it is a compile mode)")
        return self


class LmEvalSpec(Strict):
    """lm_eval tasks run on every finished run's checkpoint (the built-in bio_* tasks need no files)."""

    tasks: list[str] = Field(default_factory=list)
    include_path: str | None = None
    limit: int | None = Field(None, ge=1)
    model_args: str = ""
    allow_code: bool = Field(False, description="let task YAMLs in include_path run their `!function` hooks "
                                                "(lm_eval imports that code from the folder)")


class SamplerGridSpec(Strict):
    """Sampler settings swept on the QA probes of every run (accuracy and tokens/s): each valid (steps,
    block_length, threshold, compiled) for diffusion runs; eager and compiled decoding for AR runs; each at
    every batch size."""

    steps: list[PositiveInt] = Field(default_factory=list)
    block_length: list[PositiveInt] = Field(default_factory=list)
    threshold: list[Annotated[float, Field(ge=0.0, le=1.0)] | None] = Field(default_factory=lambda: [None])
    compiled: list[bool] = Field(default_factory=lambda: [False],
                                 description="also time the compiled samplers (same algorithm, CUDA graphs)")
    batch_size: list[PositiveInt] = Field(default_factory=list,
                                          description="probes per batch to time every setting at (default: "
                                                      "evaluation.batch_size); 1 is a chat's latency, large batches "
                                                      "an evaluation's throughput")


class EvaluationSpec(Strict):
    """Final evaluation of every run: validation loss (MC samples for diffusion) and QA probes."""

    mc_num: int = Field(32, ge=1, description="stratified Monte-Carlo samples for the diffusion ELBO")
    qa_people: int = Field(40, ge=0, description="people probed with forward and reverse questions")
    steps: int = Field(16, ge=1)
    gen_length: int = Field(16, ge=1)
    block_length: int = Field(16, ge=1)
    batch_size: int = Field(32, ge=1)
    lm_eval: LmEvalSpec = LmEvalSpec()
    sampler_grid: SamplerGridSpec = SamplerGridSpec()
    compiled: bool = Field(False, description="probes decode through the compiled samplers (torch.compile and CUDA "
                                              "graphs; the same algorithm, faster on GPUs after a compile per shape)")

    def identity(self) -> dict:
        """The settings that go into run ids: all but the speed-only switches (`compiled`, the grid's batch sizes) and
        the permission `lm_eval.allow_code`, which change no number."""
        return self.model_dump(exclude={"compiled": True, "sampler_grid": {"compiled", "batch_size"},
                                        "lm_eval": {"allow_code"}})


class SFTDecodingSpec(Strict):
    """How the SFT probes decode: `evaluation:`'s steps, gen_length and block_length where None (AR arms use
    gen_length only), with the end-token options of LLaDA's generate for the diffusion sampler
    (docs/sampling.md)."""

    steps: PositiveInt | None = None
    gen_length: PositiveInt | None = None
    block_length: PositiveInt | None = None
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = True


# The decode grid's end-token settings: the flags of LLaDA's generate each one sets.
END_TOKEN_OPTIONS = {"none": {}, "logits_eos_inf": {"logits_eos_inf": True},
                     "confidence_eos_eot_inf": {"confidence_eos_eot_inf": True},
                     "both": {"logits_eos_inf": True, "confidence_eos_eot_inf": True}}


class SFTDecodeGridSpec(Strict):
    """Decoding settings swept on every SFT run's probes after training (eval/decode_grid.csv): each combination of
    gen_length, block_length ("whole": gen_length) and end-token option, one token a step (steps = gen_length).
    AR runs decode once per gen_length. Empty lists: no sweep."""

    gen_length: list[PositiveInt] = Field(default_factory=list)
    block_length: list[PositiveInt | Literal["whole"]] = Field(default_factory=lambda: ["whole"])
    end_tokens: list[Literal[tuple(END_TOKEN_OPTIONS)]] = Field(default_factory=lambda: ["none"])


# SFT keys a variant may set (plus TrainingArguments names); the diffusion-only ones do not multiply AR runs.
VARIANT_KEYS = ("padding", "pad_tokens", "loss_norm", "lora", "r", "lora_alpha", "lora_dropout", "target_modules",
                "seed", "decoding", "decode_grid")
DIFFUSION_ONLY_KEYS = ("padding", "pad_tokens", "loss_norm")


class SFTSpec(Strict):
    """The SFT stage: each arm's pretrained model fine-tuned on Alpaca rows for each epoch count.

    `base` maps an arm to a local pretrained model folder (e.g. LLaDA-8B, Qwen2.5-7B); arms it does
    not name start from their own pretraining run with the most unique tokens, then the most epochs, then
    the most non-embedding parameters (`from_run: most_unique`), or from every one (`from_run: all`).
    `variants` lists alternatives to this section's training keys: each entry sets some of them (a list value
    means each of its values; an entry's lists combine in every way), and every variant is one SFT run per arm,
    base and epoch count.
    """

    source: str = "builtin:biographies"
    epochs: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    base: dict[str, str] = Field(default_factory=dict)
    from_run: Literal["most_unique", "all"] = "most_unique"
    max_length: int = Field(256, ge=8)
    load_preprocessed_data: bool = False
    validation_rows: int = Field(64, ge=1, description="built-in source: rows held out for SFT validation loss")
    loss_norm: Literal["sequence", "token"] = "sequence"
    padding: str = Field("eos", description="what follows each answer's EOS up to the batch's longest row, for "
                         "the diffusion arm (data/sft_padding.py): eos, pad, rainbow or masked_pad")
    pad_tokens: int = Field(7, ge=1, description="rainbow padding: distinct pad tokens in the cycle")
    seed: int | None = Field(None, ge=0, description="training seed (data order, adapter init, noise); None: the "
                             "study's seed. The held-out rows are always drawn with the study's seed")
    lora: bool = False
    r: int = Field(32, ge=1)
    lora_alpha: PositiveFloat = 64
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    decoding: SFTDecodingSpec = SFTDecodingSpec()
    decode_grid: SFTDecodeGridSpec = SFTDecodeGridSpec()
    arguments: dict[str, Any] = Field(default_factory=dict)
    variants: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("padding")
    @classmethod
    def _padding(cls, v: str) -> str:
        from dlmstudy.data.sft_padding import PADDINGS

        if v not in PADDINGS:
            raise ValueError(f"unknown padding {v!r}; known: {', '.join(PADDINGS)}")
        return v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[dict[str, Any]], info) -> list[dict[str, Any]]:
        expand_variants(info.data, v)
        return v

    def expanded(self) -> list[tuple[dict[str, Any], "SFTSpec"]]:
        """Every variant as (the keys it sets, the SFT section with them); [({}, self)] without variants."""
        return expand_variants(self.model_dump(exclude={"variants"}), self.variants) if self.variants else [({}, self)]


def expand_variants(section: dict[str, Any], variants: list[dict[str, Any]]) -> list[tuple[dict[str, Any], SFTSpec]]:
    """The SFT section `section` once per variant: each entry's keys set over it, its list values combined."""
    from dlmstudy.study import names, training_args

    hf = training_args.names()
    alias = {name: target for (section_name, name), (_, target) in names.ALIASES.items() if section_name == "sft"}
    out = []
    for i, entry in enumerate(variants):
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"entry {i} must be a non-empty mapping of SFT keys")
        for key in entry:
            if key not in VARIANT_KEYS and alias.get(key, key) not in hf:
                raise ValueError(f"entry {i}: {key} is not a key a variant can set (SFT keys: "
                                 f"{', '.join(VARIANT_KEYS)}, or a TrainingArguments name)")
        lists = {k: v if isinstance(v, list) and not (k == "target_modules" and all(isinstance(x, str) for x in v))
                 else [v] for k, v in entry.items()}
        for values in itertools.product(*lists.values()):
            keys = dict(zip(lists, values))
            own = {k: v for k, v in keys.items() if k in VARIANT_KEYS}
            arguments = {**section.get("arguments", {}),
                         **{alias.get(k, k): v for k, v in keys.items() if k not in VARIANT_KEYS}}
            try:
                spec = SFTSpec.model_validate({**section, **own, "variants": [], "arguments": arguments})
            except ValidationError as err:
                first = err.errors()[0]
                raise ValueError(f"entry {i}: {'.'.join(map(str, first['loc']))}: "
                                 f"{first['msg'].removeprefix('Value error, ')}") from None
            out.append((keys, spec))
    return out


class ClusterSpec(Strict):
    """Slurm options of `dlmstudy run --slurm` (submitted through submitit): one job per run, an array when several
    runs are ready at once. A `--slurm_<key>` flag overrides the key. Each run trains on one GPU (or the CPU)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int | str = Field(240, description="a job's time limit: minutes, or Slurm's [D-]HH:MM:SS; a run that "
                            "needs longer saves a checkpoint, is requeued and resumes")
    gpus_per_run: int = Field(1, ge=0, le=1, description="GPUs of a job: 1, or 0 on a CPU partition")
    cpus_per_run: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    constraint: str | None = None
    array_parallelism: int = Field(256, ge=1, description="at most this many jobs of one array at once")
    setup: list[str] = Field(default_factory=list, description="shell lines each job runs first (module load ..., "
                             "source .venv/bin/activate)")
    signal_delay_s: int = Field(120, ge=10, description="SIGUSR2 this many seconds before the time limit: the run "
                                "saves a checkpoint and the job is requeued")

    @field_validator("time")
    @classmethod
    def _time(cls, v: int | str) -> int | str:
        minutes_of(v)
        return v

    @property
    def minutes(self) -> int:
        """The time limit in whole minutes, as submitit takes it."""
        return minutes_of(self.time)


def minutes_of(value: int | str) -> int:
    """Minutes of a Slurm time: an int, "MM", "HH:MM:SS" or "D-HH:MM:SS" (seconds round up)."""
    if isinstance(value, int):
        if value < 1:
            raise ValueError("a time limit must be at least 1 minute")
        return value
    days, _, clock = value.strip().rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        raise ValueError("use minutes, HH:MM:SS or D-HH:MM:SS")
    if len(parts) == 1:
        h, m, sec = 0, int(parts[0]), 0
    else:
        h, m, sec = ([0] + [int(p) for p in parts])[-3:]
    total = int(days or 0) * 1440 + h * 60 + m + (sec > 0)
    if total < 1:
        raise ValueError("a time limit must be at least 1 minute")
    return total


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _study_name(v: str) -> str:
    if not NAME.fullmatch(v) or ".." in v:
        raise ValueError("a plain identifier: letters, digits, '_', '-' and '.', at most 64, starting with a "
                         "letter or digit, no '..' (it names the folders runs_dir/<name> and reports_dir/<name>)")
    return v


class StudySpec(Strict):
    """A whole study: every arm trained on the same tokens with the same budget, evaluated the same way."""

    name: Annotated[str, AfterValidator(_study_name)]
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    runs_dir: str = "runs"
    reports_dir: str = "reports"
    tracking: TrackingSpec = TrackingSpec()
    tokenizer: TokenizerSpec = TokenizerSpec()
    data: DataSpec = DataSpec()
    arms: list[str] = Field(default_factory=lambda: ["llada", "qwen"], min_length=1)
    model: ModelSpec = ModelSpec()
    grid: GridSpec
    training: TrainingSpec = TrainingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    sft: SFTSpec | None = None
    cluster: ClusterSpec | None = None
    comparisons: list[tuple[str, str]] | None = Field(
        None, min_length=1, description="pairs [diffusion arm, AR arm] of `arms:` the claims compare (stored "
        "diffusion first); without it every diffusion arm is compared with every AR arm")

    @field_validator("comparisons")
    @classmethod
    def _comparisons(cls, v: list[tuple[str, str]] | None, info: ValidationInfo) -> list[tuple[str, str]] | None:
        return None if v is None or "arms" not in info.data else check_comparisons(info.data["arms"], v)


def _where(loc: tuple) -> str:
    """A pydantic error location as the spec key: `grid.unique_tokens[0]`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _format(err: ValidationError) -> list[str]:
    """One line per error of `err`, each naming its key."""
    from dlmstudy.study import names, training_args

    lines = []
    for e in err.errors():
        key = _where(e["loc"])
        last = str(e["loc"][-1]) if e["loc"] else ""
        if e["type"] == "extra_forbidden":
            hint = names.where_instead(last) if len(e["loc"]) == 1 else None
            if len(e["loc"]) == 1 and last in training_args.names():
                hint = f"training.{last} (TrainingArguments names go under training:)"
            lines.append(f"unknown key '{key}'" + (f" (write it as {hint})" if hint else ""))
        elif e["type"] == "missing":
            lines.append(f"missing key '{key}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            msg = msg[:1].lower() + msg[1:]
            got = "" if isinstance(e.get("input"), dict) else f" (got {_shown(e.get('input'))})"
            lines.append(f"{key}: {msg}{got}" if key else msg)
    return lines


@functools.cache
def _section_model(name: str) -> type[BaseModel]:
    """A model of StudySpec's field `name` alone, so each section validates without the others."""
    field = StudySpec.model_fields[name]
    return create_model(f"StudySpec_{name}", __base__=Strict, **{name: (field.annotation, field)})


def _validate_sections(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Each top-level section validated on its own: (the valid ones, every problem of the others)."""
    sections, problems = {}, []
    for name in StudySpec.model_fields:
        if name not in raw:
            continue
        try:
            sections[name] = getattr(_section_model(name).model_validate({name: raw[name]}), name)
        except ValidationError as err:
            problems += _format(err)
    for name, field in StudySpec.model_fields.items():
        if name not in raw:
            if field.is_required():
                problems.append(f"missing key '{name}'")
            else:
                sections[name] = field.get_default(call_default_factory=True)
    problems += [f"unknown key '{k}'" + (f" (write it as {h})" if (h := _hint(k)) else "")
                 for k in raw if k not in StudySpec.model_fields]
    return sections, problems


def _hint(key: Any) -> str | None:
    from dlmstudy.study import names, training_args

    if not isinstance(key, str):
        return None
    if key in training_args.names():
        return f"training.{key} (TrainingArguments names go under training:)"
    return names.where_instead(key)


def spec_problems(raw: Any) -> tuple[StudySpec | None, list[str]]:
    """The validated spec (None when there are problems) and every problem of `raw`, one line each."""
    from dlmstudy.study import checks, names, training_args

    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        return None, [f"a study spec must be a YAML mapping of its sections (got {got})"]
    raw = copy.deepcopy(raw)
    problems = names.apply_aliases(raw)
    if isinstance(raw.get("training"), dict):
        raw["training"], found = training_args.split_training(
            raw["training"], "training", set(TrainingSpec.model_fields) - {"arguments"}, training_args.STUDY_SETS)
        problems += found
    if isinstance(raw.get("sft"), dict):
        raw["sft"], found = training_args.split_training(
            raw["sft"], "sft", set(SFTSpec.model_fields) - {"arguments"}, training_args.SFT_SETS)
        problems += found
    sections, found = _validate_sections(raw)
    problems += found
    problems += checks.cross_checks(sections)
    if problems:
        return None, list(dict.fromkeys(problems))
    try:
        return StudySpec.model_validate(raw), []
    except ValidationError as err:
        return None, _format(err)


class SpecError(UserError):
    """Every problem of one spec file, one line each (`path: problem`)."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.problems = [f"{path}: {p}" for p in problems]
        super().__init__("\n".join(self.problems))


def parse_spec(raw: Any, path: str | Path = "<spec>") -> StudySpec:
    """Validate a spec mapping; every problem is reported at once, each a line naming the key and the file."""
    from dlmstudy.study import names

    if isinstance(raw, dict) and names.looks_like_dllm(raw):
        raise UserError(f"{path}: a dllm / tutorial training YAML (model_name_or_path, dataset_args, ...), not a "
                        f"study spec (missing key 'name'); `dlmstudy import-dllm {path}` converts it")
    spec, problems = spec_problems(raw)
    if problems:
        raise SpecError(path, problems)
    return spec


# What a study is made of, for its digest: all but where it is written, how it is tracked, and the switches that
# change speed, not results (as run ids leave them out).
NOT_IDENTITY = {"runs_dir": True, "reports_dir": True, "tracking": True,
                "training": {"fast_head", "head_chunk", "compile", "cuda_graphs"},
                "evaluation": {"compiled": True, "lm_eval": {"allow_code"}, "sampler_grid": {"compiled", "batch_size"}}}


def _pruned(value: Any) -> Any:
    """`value` without the mappings left empty (a section whose every given key is excluded is no difference)."""
    if not isinstance(value, dict):
        return value
    kept = {k: _pruned(v) for k, v in value.items()}
    return {k: v for k, v in kept.items() if v != {}}


def spec_digest(spec: StudySpec) -> str:
    """A hash of what the study is (settings left at their defaults do not count, so new keys keep old digests)."""
    content = _pruned(spec.model_dump(mode="json", exclude_defaults=True, exclude=NOT_IDENTITY))
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def check_study_folder(spec: StudySpec) -> list[str]:
    """A study folder holds one spec's runs: one written by a spec of the same name with other contents refuses
    this one (its runs would be mixed into one report)."""
    index = Path(spec.runs_dir) / spec.name / "study.json"
    try:
        recorded = json.loads(index.read_text()).get("spec_digest") if index.is_file() else None
    except (OSError, ValueError, AttributeError):  # an unreadable index is rewritten by the next run
        return []
    if recorded is None or recorded == spec_digest(spec):
        return []
    return [f"name: {index.parent} holds the runs of another spec named {spec.name!r} (digest {recorded}, this one "
            f"{spec_digest(spec)}); give this study a new name, or move {index.parent} away to start it over"]


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec file, and check that its study folder holds no other spec's runs."""
    from dlmstudy.study.yaml_file import read_yaml

    spec = parse_spec(read_yaml(path), path)
    problems = check_study_folder(spec)
    if problems:
        raise SpecError(path, problems)
    return spec
