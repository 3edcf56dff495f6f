"""The tutorial's and dllm's names in a study spec: taken where they mean one thing, refused with where to write
them where they could mean two, and pointed to their place where they are keys of a dllm training YAML.
"""

from __future__ import annotations

from typing import Any

# (section, name) -> (section, the spec's name); a section is a dotted path ("" is the top level).
ALIASES: dict[tuple[str, str], tuple[str, str]] = {
    ("training", "max_length"): ("data", "max_length"),  # dllm's DataArguments: the packed sequence length
    ("training", "warmup_ratio"): ("training", "warmup_steps"),  # transformers 5: a warmup_steps below 1 is a ratio
    ("sft", "warmup_ratio"): ("sft", "warmup_steps"),
    ("evaluation", "block_size"): ("evaluation", "block_length"),  # dllm's sampler, the tutorial's lm_eval model_args
    ("evaluation", "max_new_tokens"): ("evaluation", "gen_length"),  # transformers' generate, the tutorial's Qwen chat
    ("evaluation.sampler_grid", "block_size"): ("evaluation.sampler_grid", "block_length"),
}

# (section, name) -> why it is refused: the name means different settings in the tutorial's different tools.
AMBIGUOUS: dict[tuple[str, str], str] = {
    ("evaluation", "max_length"): "ambiguous: the tutorial's chat means the tokens to generate "
                                  "(evaluation.gen_length), lm_eval's model_args the context length "
                                  "(data.max_length); write the one you mean",
}

# Keys of a dllm / tutorial training YAML and where a study spec sets them.
DLLM_KEYS: dict[str, str] = {
    "model_name_or_path": "arms (models trained from scratch) or sft.base.<arm> (a model to fine-tune)",
    "dataset_args": "data.pretrain.source (sft.source for SFT)",
    "text_field": "data.pretrain.text_field",
    "streaming": "data.pretrain.source (local files are read in a stream already)",
    "num_proc": "data.num_proc",
    "drop_tail": "data.drop_tail",
    "insert_eos": "data.insert_eos",
    "max_length": "data.max_length (sft.max_length for SFT)",
    "random_length_ratio": "training.random_length_ratio",
    "load_preprocessed_data": "sft.load_preprocessed_data",
    "lora": "sft.lora", "r": "sft.r", "lora_alpha": "sft.lora_alpha", "lora_dropout": "sft.lora_dropout",
    "target_modules": "sft.target_modules",
}
DLLM_MARKERS = ("model_name_or_path", "dataset_args")


def _section(raw: dict, dotted: str, create: bool = False) -> dict | None:
    """The mapping at `dotted` inside `raw` (None where a part is absent or not a mapping)."""
    node: Any = raw
    for part in filter(None, dotted.split(".")):
        if create and part not in node:
            node[part] = {}
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return None
    return node


def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def apply_aliases(raw: dict) -> list[str]:
    """Rename the tutorial's and dllm's keys in `raw` (in place) to the spec's; the problems found, one line each."""
    problems = []
    for (section, name), why in AMBIGUOUS.items():
        node = _section(raw, section)
        if node is not None and name in node:
            node.pop(name)
            problems.append(f"{_key(section, name)}: {why}")
    for (section, name), (target_section, target) in ALIASES.items():
        node = _section(raw, section)
        if node is None or name not in node:
            continue
        value = node.pop(name)
        if name == "warmup_ratio" and isinstance(value, (int, float)) and not 0 <= value < 1:
            problems.append(f"{_key(section, name)}: a ratio in [0, 1) (got {value!r}); warmup_steps counts steps")
            continue
        into = _section(raw, target_section, create=True)
        if into is None:
            continue  # the target section is not a mapping: validation names it
        if target in into and into[target] != value:
            problems.append(f"{_key(section, name)} and {_key(target_section, target)} are the same setting, given "
                            f"twice ({value!r} and {into[target]!r}); keep one")
            continue
        into[target] = value
    return problems


def looks_like_dllm(raw: dict) -> bool:
    """A dllm / tutorial training YAML: flat ModelArguments, DataArguments and TrainingArguments, no study name."""
    return "name" not in raw and any(k in raw for k in DLLM_MARKERS)


def where_instead(name: str) -> str | None:
    """Where a study spec sets a dllm training YAML's key, if it is one."""
    return DLLM_KEYS.get(name)
