"""Preparing a study's shared data and resolving its runs (ids, unique tokens, parameter counts).

Data preparation is shared by every run of a study and cached under `runs/<study>/_cache/`, so a
second invocation reuses the tokenizer and token streams. A plan needs no data when the grid is
given in unique tokens: `resolve_runs(spec, tokens=plan_tokens(spec)[0])` works from the spec alone
(`dlmstudy.runners.planning` builds the plan and its estimates on top of this module).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from dlmstudy.atomic import write_json_atomic
from dlmstudy.data.biographies import QAItem
from dlmstudy.data.corpus import Corpus, corpus_streams, load_corpus
from dlmstudy.data.packing import TokenStream
from dlmstudy.data.sources import FILE_NAME, HUB_NAME, hub_reachable, parse_source
from dlmstudy.data.tokenizer import get_tokenizer, special_tokens
from dlmstudy.errors import UserError
from dlmstudy.models.backbones import ModelSize, SpecialTokens, build_config
from dlmstudy.models.matching import check_match, match_arms, split_overrides
from dlmstudy.models.params import ParamCounts, count_config
from dlmstudy.models.registry import Arm, get_arm
from dlmstudy.study.plan import DataSetting, config_digest, data_settings, run_id
from dlmstudy.study.spec import StudySpec, spec_digest


@dataclass
class StudyData:
    """Everything the runs of one study share: tokenizer, corpus, token streams, validation chunks."""

    tokenizer: PreTrainedTokenizerBase
    tokens: SpecialTokens
    corpus: Corpus
    train: TokenStream
    validation: np.ndarray
    fingerprint: str


@dataclass
class Run:
    """One arm trained on one data setting: its id, folder and fully resolved config."""

    run_id: str
    arm: Arm
    size: ModelSize
    unique_tokens: int
    epochs: float
    params: ParamCounts
    config: dict
    dir: Path
    stage: str = "pretrain"

    @property
    def total_tokens(self) -> int:
        return int(self.config["total_tokens"])

    def ready(self) -> bool:
        """Whether the run can start now: a pretraining run needs nothing from another run."""
        return True


# Training settings that change speed, not results: left out of run ids.
SPEED_ONLY = {"fast_head", "head_chunk", "compile", "cuda_graphs"}


def fast_path(spec: StudySpec) -> dict:
    """Objective settings for the exact fast head (`training.fast_head`, on by default) and optional compilation."""
    ts = spec.training
    return {"fast_head": True, "chunk": ts.head_chunk, "compiled": ts.compile} if ts.fast_head else {}


def study_dir(spec: StudySpec) -> Path:
    return Path(spec.runs_dir) / spec.name


@dataclass(frozen=True)
class MissingInput:
    """A local path the spec names that does not exist, with the spec key that names it."""

    key: str
    path: str
    reason: str = "not found"

    def __str__(self) -> str:
        return f"{self.key} {self.path} ({self.reason})"


def _missing_source(key: str, source: str) -> MissingInput | None:
    if source.startswith("builtin:"):
        return None
    location = parse_source(source).location
    if Path(location).exists():
        return None
    hub_like = not location.startswith(("/", ".")) and HUB_NAME.match(location) and not FILE_NAME.search(location)
    if hub_like and hub_reachable():
        return None
    return MissingInput(key, location, "not found; not a local path and the hub is offline" if hub_like else
                        "not found")


def missing_inputs(spec: StudySpec) -> list[MissingInput]:
    """Every input the study reads that is absent: corpus, tokenizer folder, SFT data and base models, task folder."""
    found = [_missing_source("data.pretrain.source", spec.data.pretrain.source)]
    if spec.tokenizer.kind == "pretrained" and not Path(spec.tokenizer.path).is_dir():
        found.append(MissingInput("tokenizer.path", spec.tokenizer.path))
    if spec.sft is not None:
        found.append(_missing_source("sft.source", spec.sft.source))
        found += [MissingInput(f"sft.base.{arm}", path) for arm, path in spec.sft.base.items()
                  if not Path(path).exists()]
    include = spec.evaluation.lm_eval.include_path
    if include is not None and not Path(include).is_dir():
        found.append(MissingInput("evaluation.lm_eval.include_path", include))
    return [m for m in found if m is not None]


# The Qwen2 tokenizer (docs/data.md) as the study completes it: 151,647 ids, <|mask|> included, 151,680 rows.
ASSUMED_TOKENS = SpecialTokens(vocab_size=151680, pad_token_id=151643, eos_token_id=151643, mask_token_id=151646)


def plan_tokens(spec: StudySpec) -> tuple[SpecialTokens, str]:
    """The models' token ids without the data, and where the vocabulary size came from: the tokenizer folder
    (`len(tokenizer)` rounded as `special_tokens` does), the BPE's size, or, with the folder absent, Qwen2's."""
    tk = spec.tokenizer
    if tk.kind == "bpe":
        rows = 64 * -(-tk.vocab_size // 64)
        note = (f"vocabulary {rows:,} rows: the BPE's tokenizer.vocab_size {tk.vocab_size:,} rounded up to 64 "
                "(trained at run time; a small corpus can give fewer)")
        return SpecialTokens(vocab_size=rows, pad_token_id=1, eos_token_id=0, mask_token_id=2), note
    if Path(tk.path).is_dir():
        tokens = special_tokens(get_tokenizer("pretrained", path=tk.path))
        return tokens, f"vocabulary {tokens.vocab_size:,} rows from {tk.path}"
    return ASSUMED_TOKENS, (f"vocabulary {ASSUMED_TOKENS.vocab_size:,} rows assumed, as the Qwen2 tokenizer gives "
                            f"(151,647 ids with <|mask|>, rounded up to 64): tokenizer.path {tk.path} not found")


def prepare_data(spec: StudySpec, *, progress=print, check_inputs: bool = True) -> StudyData:
    """Load the corpus, train or load the tokenizer, tokenize (cached) and cut validation chunks.

    First every input of the study is checked, so a missing SFT base stops the study before its pretraining."""
    missing = missing_inputs(spec) if check_inputs else []
    if missing:
        more = f" (and {len(missing) - 1} more; dlmstudy plan lists them)" if len(missing) > 1 else ""
        raise UserError(f"missing input: {missing[0]}{more}")
    cache = study_dir(spec) / "_cache"
    cache.mkdir(parents=True, exist_ok=True)
    src = spec.data.pretrain
    progress(f"data: {src.source}")
    corpus = load_corpus(src.source, text_field=src.text_field, people=src.people,
                         per_person=src.biographies_per_person, qa_fraction=src.qa_fraction, seed=spec.data.seed)
    tok = get_tokenizer(spec.tokenizer.kind, texts=corpus.tokenizer_texts(), vocab_size=spec.tokenizer.vocab_size,
                        path=spec.tokenizer.path, cache_dir=cache, sample_bytes=spec.tokenizer.sample_bytes)
    train, val = corpus_streams(corpus, tok, cache, validation_tokens=spec.data.validation_tokens,
                                insert_eos=spec.data.insert_eos, num_proc=spec.data.num_proc)
    L = spec.data.max_length
    n_val = min(len(val) // L, max(1, spec.data.validation_tokens // L))
    if n_val == 0:
        raise UserError(f"the validation text holds no full sequence of max_length {L}")
    validation = np.asarray(val.tokens[: n_val * L]).reshape(n_val, L)
    fingerprint = f"{len(tok)}:{len(train)}:{int(np.asarray(train.tokens[:4096], dtype=np.int64).sum())}"
    progress(f"data: {train.n_docs:,} training documents, {len(train):,} tokens; "
             f"validation {n_val * L:,} tokens; vocabulary {len(tok):,}")
    return StudyData(tok, special_tokens(tok), corpus, train, validation, fingerprint)


def unique_tokens_of(setting: DataSetting, data: StudyData | None, max_length: int) -> int:
    """Unique tokens of a data setting, rounded down to whole sequences (people: their documents' tokens).

    Without data (a plan from the spec) tokens are taken as given, unchecked against the corpus."""
    if setting.unit == "tokens":
        u = setting.unique
        if data is None:
            return (u // max_length) * max_length
    elif data is None:
        raise UserError("grid.unique_people counts tokens of the built-in corpus: prepare the data first")
    else:
        groups = data.corpus.groups
        if groups is None:
            raise UserError("grid.unique_people needs the built-in biographies; use grid.unique_tokens for a corpus")
        if setting.unique > groups[-1] + 1:
            raise UserError(f"grid.unique_people {setting.unique} exceeds data.pretrain.people ({groups[-1] + 1})")
        last_doc = max(i for i, g in enumerate(groups) if g < setting.unique)
        u = int(data.train.doc_ends[last_doc])
    if u > len(data.train):
        raise UserError(f"unique tokens {u:,} exceed the corpus ({len(data.train):,} training tokens)")
    return (u // max_length) * max_length


def arm_sizes(spec: StudySpec, arms: list[Arm], tokens: SpecialTokens, target: int | None) -> dict[str, ModelSize]:
    """Each arm's size: the spec's `model:` (or the shape solved for a parameter target) plus the arm's overrides."""
    if target is not None:
        base = ModelSize(**spec.model.model_dump(include={f.name for f in dataclasses.fields(ModelSize)}))
        matched = match_arms(arms, target, vocab_size=tokens.vocab_size, kind=spec.grid.params_kind, base=base,
                             tolerance=spec.model.match_tolerance)
        return {name: m.size for name, m in matched.items()}
    fields = {f.name for f in dataclasses.fields(ModelSize)}
    base = spec.model.model_dump(include=fields)
    return {a.name: ModelSize(**{**base, **split_overrides(a)[0]}) for a in arms}


def training_arguments(spec: StudySpec, arm: Arm) -> dict:
    """The spec's TrainingArguments with the arm's training overrides (e.g. weight decay)."""
    return {**spec.training.arguments, **split_overrides(arm)[1]}


def resolve_runs(spec: StudySpec, data: StudyData | None = None, *, tokens: SpecialTokens | None = None) -> list[Run]:
    """Every run of the study, in order: sizes, then data settings, arms innermost (so pairs finish together).

    Without data (`tokens` given instead) run ids are labels only: their hash covers the data's fingerprint."""
    arms = [get_arm(a) for a in spec.arms]
    L = spec.data.max_length
    tokens = data.tokens if data is not None else tokens
    runs = []
    for target in spec.grid.params or [None]:
        sizes = arm_sizes(spec, arms, tokens, target)
        counts = {a.name: count_config(build_config(a.backbone, sizes[a.name], tokens, causal=a.causal))
                  for a in arms}
        check_match(counts, spec.model.match_tolerance)
        runs += _runs_at_size(spec, data, tokens, arms, sizes, counts, L, target)
    check_distinct(runs)
    return runs


def check_distinct(runs: list[Run]) -> None:
    """Refuse two grid points that make one run (e.g. parameter targets that solve to one shape), which would
    otherwise share a folder or train the same model twice under two labels."""
    first: dict[str, Run] = {}
    for run in runs:
        same = config_digest({k: v for k, v in run.config.items() if k != "params_target"})
        if same in first:
            other = first[same]
            where = (f"grid.params {other.config['params_target']:,} and {run.config['params_target']:,} give arm "
                     f"{run.arm.name} the same shape" if other.config["params_target"] != run.config["params_target"]
                     else f"runs {other.run_id} and {run.run_id} are the same")
            raise UserError(f"{where}; keep one")
        first[same] = run


def _runs_at_size(spec: StudySpec, data: StudyData | None, tokens: SpecialTokens, arms: list[Arm],
                  sizes: dict[str, ModelSize], counts: dict[str, ParamCounts], L: int, target: int | None) -> list[Run]:
    runs = []
    for setting in data_settings(spec.grid):
        u = unique_tokens_of(setting, data, L)
        epochs = setting.epochs_for(u)
        for arm in arms:
            config = {
                "study": spec.name, "arm": arm.name, "backbone": arm.backbone, "objective": arm.objective,
                "sampler": arm.sampler, "seed": spec.seed, "size": dataclasses.asdict(sizes[arm.name]),
                "tokens": dataclasses.asdict(tokens), "data_fingerprint": data.fingerprint if data else None,
                "unique_tokens": u, "unique_people": setting.unique if setting.unit == "people" else None,
                "epochs": round(epochs, 6), "total_tokens": round(epochs * (u // L)) * L, "max_length": L,
                "data_seed": spec.data.seed, "training": training_arguments(spec, arm),
                "objective_settings": spec.training.model_dump(exclude={"arguments", *SPEED_ONLY}),
                "evaluation": spec.evaluation.identity(), "device": spec.device,
                "params": counts[arm.name].as_dict(), "params_target": target,
            }
            rid = run_id(config) if data is not None else run_id(config).rsplit("_", 1)[0]
            runs.append(Run(rid, arm, sizes[arm.name], u, epochs, counts[arm.name], config, study_dir(spec) / rid))
    return runs


def probe_items(spec: StudySpec, data: StudyData, runs: list[Run]) -> list[QAItem]:
    """QA probes shared by every run: held-out-QA people inside the smallest training prefix."""
    if not data.corpus.probes or spec.evaluation.qa_people == 0:
        return []
    smallest = min(r.unique_tokens for r in runs)
    ends = data.train.doc_ends
    groups = data.corpus.groups
    inside = {g for g, end in zip(groups, ends) if end <= smallest}
    complete = {g for g in inside if all(end <= smallest for gg, end in zip(groups, ends) if gg == g)}
    people = sorted(p for p in data.corpus.probes if p in complete)[: spec.evaluation.qa_people]
    return [item for p in people for item in data.corpus.probes[p]]


def write_study_index(spec: StudySpec, runs: list[Run], sft_runs: list | None = None) -> None:
    """`runs/<study>/study.json`: the planned runs, so a report can list the ones still missing, and the spec's
    digest, so a spec of the same name with other contents is refused (`check_study_folder`)."""
    path = study_dir(spec) / "study.json"
    index = {"name": spec.name, "spec_digest": spec_digest(spec), "spec": spec.model_dump(), "runs": [
        {"run_id": r.run_id, "stage": "pretrain", "arm": r.arm.name, "unique_tokens": r.unique_tokens,
         "epochs": r.epochs, "total_tokens": r.total_tokens, "params_total": r.params.total,
         "params_non_embedding": r.params.non_embedding} for r in runs] + [
        {"run_id": r.run_id, "stage": "sft", "arm": r.arm.name, "sft_epochs": r.epochs, "parent": r.parent}
        for r in sft_runs or []]}
    write_json_atomic(path, index)
