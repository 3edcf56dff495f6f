"""Preparing a study's shared data and resolving its runs (ids, unique tokens, parameter counts).

Data preparation is shared by every run of a study and cached under `runs/<study>/_cache/`, so a
second invocation (or `dlmstudy plan`) reuses the tokenizer and token streams.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from dlmstudy.data.biographies import QAItem
from dlmstudy.data.corpus import Corpus, corpus_streams, load_corpus
from dlmstudy.data.packing import TokenStream
from dlmstudy.data.tokenizer import get_tokenizer, special_tokens
from dlmstudy.errors import UserError
from dlmstudy.models.backbones import ModelSize, SpecialTokens, build_config
from dlmstudy.models.matching import check_match, match_arms, split_overrides
from dlmstudy.models.params import ParamCounts, count_config
from dlmstudy.models.registry import Arm, get_arm
from dlmstudy.study.plan import DataSetting, data_settings, run_id
from dlmstudy.study.spec import StudySpec


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


def study_dir(spec: StudySpec) -> Path:
    return Path(spec.runs_dir) / spec.name


def prepare_data(spec: StudySpec, *, progress=print) -> StudyData:
    """Load the corpus, train or load the tokenizer, tokenize (cached) and cut validation chunks."""
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


def unique_tokens_of(setting: DataSetting, data: StudyData, max_length: int) -> int:
    """Unique tokens of a data setting, rounded down to whole sequences (people: their documents' tokens)."""
    if setting.unit == "tokens":
        u = setting.unique
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


def resolve_runs(spec: StudySpec, data: StudyData) -> list[Run]:
    """Every run of the study, in order: sizes, then data settings, arms innermost (so pairs finish together)."""
    arms = [get_arm(a) for a in spec.arms]
    L = spec.data.max_length
    runs = []
    for target in spec.grid.params or [None]:
        sizes = arm_sizes(spec, arms, data.tokens, target)
        counts = {a.name: count_config(build_config(a.backbone, sizes[a.name], data.tokens, causal=a.causal))
                  for a in arms}
        check_match(counts, spec.model.match_tolerance)
        runs += _runs_at_size(spec, data, arms, sizes, counts, L, target)
    return runs


def _runs_at_size(spec: StudySpec, data: StudyData, arms: list[Arm], sizes: dict[str, ModelSize],
                  counts: dict[str, ParamCounts], L: int, target: int | None) -> list[Run]:
    runs = []
    for setting in data_settings(spec.grid):
        u = unique_tokens_of(setting, data, L)
        epochs = setting.epochs_for(u)
        for arm in arms:
            config = {
                "study": spec.name, "arm": arm.name, "backbone": arm.backbone, "objective": arm.objective,
                "sampler": arm.sampler, "seed": spec.seed, "size": dataclasses.asdict(sizes[arm.name]),
                "tokens": dataclasses.asdict(data.tokens), "data_fingerprint": data.fingerprint,
                "unique_tokens": u, "unique_people": setting.unique if setting.unit == "people" else None,
                "epochs": round(epochs, 6), "total_tokens": round(epochs * (u // L)) * L, "max_length": L,
                "data_seed": spec.data.seed, "training": training_arguments(spec, arm),
                "objective_settings": spec.training.model_dump(exclude={"arguments", "fast_head", "head_chunk"}),
                "evaluation": spec.evaluation.model_dump(), "device": spec.device,
                "params": counts[arm.name].as_dict(), "params_target": target,
            }
            rid = run_id(config)
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
    """`runs/<study>/study.json`: the planned runs, so a report can list the ones still missing."""
    path = study_dir(spec) / "study.json"
    index = {"name": spec.name, "spec": spec.model_dump(), "runs": [
        {"run_id": r.run_id, "stage": "pretrain", "arm": r.arm.name, "unique_tokens": r.unique_tokens,
         "epochs": r.epochs, "total_tokens": r.total_tokens, "params_total": r.params.total,
         "params_non_embedding": r.params.non_embedding} for r in runs] + [
        {"run_id": r.run_id, "stage": "sft", "arm": r.arm.name, "sft_epochs": r.epochs, "parent": r.parent}
        for r in sft_runs or []]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2, default=str))
    tmp.replace(path)
