"""The study spec: one YAML file, validated strictly (unknown keys are errors naming key and file).

`training:` is passed to `transformers.TrainingArguments` where the name exists there; the few
keys that are ours (sequence length, LLaDA's random-length ratio, ...) live in `TrainingSpec`.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from dlmstudy.errors import UserError


class Strict(BaseModel):
    """Base for every spec section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class TrackingSpec(Strict):
    """Where metrics go. SwanLab runs offline unless `mode: online` (and the user has logged in)."""

    report_to: Literal["swanlab", "none"] = "swanlab"
    project: str = "dlmstudy"
    mode: Literal["offline", "online", "local", "disabled"] = "offline"


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

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dropout: float = 0.0
    match_tolerance: float = Field(0.02, ge=0.0, description="largest relative non-embedding difference between arms")


class GridSpec(Strict):
    """The data settings: unique tokens (or people, for the built-in data) x epochs."""

    unique_tokens: list[int] | None = None
    unique_people: list[int] | None = None
    epochs: list[float] | None = None
    total_tokens: int | None = Field(None, description="fix total tokens and derive epochs = total / unique")
    pairing: Literal["zip", "product"] = "product"
    params: list[int] | None = Field(None, description="parameter targets solved per arm by the aspect rule "
                                     "(docs/arms.md); without it every run uses `model:`")
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


class SamplerGridSpec(Strict):
    """Sampler settings swept on the QA probes of every run (accuracy and tokens/s): each valid (steps,
    block_length, threshold, compiled) for diffusion runs; eager and compiled decoding for AR runs; each at
    every batch size."""

    steps: list[int] = Field(default_factory=list)
    block_length: list[int] = Field(default_factory=list)
    threshold: list[float | None] = Field(default_factory=lambda: [None])
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
        """The settings that go into run ids: all but the speed-only switches (`compiled`, the grid's batch sizes)."""
        return self.model_dump(exclude={"compiled": True, "sampler_grid": {"compiled", "batch_size"}})


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
    epochs: list[int] = Field(default_factory=lambda: [1], min_length=1)
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
    lora_alpha: float = 64
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
    hf = _training_argument_names()
    out = []
    for i, entry in enumerate(variants):
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"entry {i} must be a non-empty mapping of SFT keys")
        for key in entry:
            if key not in VARIANT_KEYS and TRAINING_ALIASES.get(key, key) not in hf:
                raise ValueError(f"entry {i}: {key} is not a key a variant can set (SFT keys: "
                                 f"{', '.join(VARIANT_KEYS)}, or a TrainingArguments name)")
        lists = {k: v if isinstance(v, list) and not (k == "target_modules" and all(isinstance(x, str) for x in v))
                 else [v] for k, v in entry.items()}
        for values in itertools.product(*lists.values()):
            keys = dict(zip(lists, values))
            own = {k: v for k, v in keys.items() if k in VARIANT_KEYS}
            arguments = {**section.get("arguments", {}),
                         **{TRAINING_ALIASES.get(k, k): v for k, v in keys.items() if k not in VARIANT_KEYS}}
            try:
                spec = SFTSpec.model_validate({**section, **own, "variants": [], "arguments": arguments})
            except ValidationError as err:
                first = err.errors()[0]
                raise ValueError(f"entry {i}: {'.'.join(map(str, first['loc']))}: "
                                 f"{first['msg'].removeprefix('Value error, ')}") from None
            out.append((keys, spec))
    return out


class StudySpec(Strict):
    """A whole study: every arm trained on the same tokens with the same budget, evaluated the same way."""

    name: str
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

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ "):
            raise ValueError("name must be non-empty with no spaces or slashes")
        return v


def _training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


# Names older transformers (and the tutorial's configs) use, mapped onto today's TrainingArguments.
TRAINING_ALIASES = {"warmup_ratio": "warmup_steps"}  # transformers 5: a float warmup_steps < 1 is a ratio


def _split_training(raw: dict[str, Any], path: Path, section: str = "training",
                    ours: set[str] | None = None) -> dict[str, Any]:
    """Move TrainingArguments names under `<section>.arguments`; anything unknown is an error."""
    ours = (set(TrainingSpec.model_fields) if ours is None else ours) - {"arguments"}
    hf = _training_argument_names()
    out: dict[str, Any] = {"arguments": dict(raw.pop("arguments", {}) or {})}
    for key, value in raw.items():
        key = TRAINING_ALIASES.get(key, key)
        if key in ours:
            out[key] = value
        elif key in hf:
            out["arguments"][key] = value
        else:
            raise UserError(f"{path}: unknown key '{section}.{key}' (not a dlmstudy or transformers.TrainingArguments setting)")
    return out


def _format_error(err: ValidationError, path: Path) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key '{loc}'"
    if first["type"] == "missing":
        return f"{path}: missing key '{loc}'"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{path}: {loc + ': ' if loc else ''}{msg} (got {first.get('input')!r})" if loc else f"{path}: {msg}"


def parse_spec(raw: dict[str, Any], path: str | Path = "<spec>") -> StudySpec:
    """Validate a spec dictionary; errors are one-line UserErrors naming the key and the file."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a study spec must be a YAML mapping")
    raw = dict(raw)
    if isinstance(raw.get("training"), dict):
        raw["training"] = _split_training(dict(raw["training"]), path)
    if isinstance(raw.get("sft"), dict):
        raw["sft"] = _split_training(dict(raw["sft"]), path, "sft", set(SFTSpec.model_fields))
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_error(err, path)) from None


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML") from None
    return parse_spec(raw, path)
